-- binary-trees: builds and walks complete binary trees of tables, most of them short-lived
-- (allocation and the garbage collector; every new node is a first write).
-- Usage: binary_trees.lua DEPTH
local function build(depth)
  if depth == 0 then
    return {}
  end
  depth = depth - 1
  return { build(depth), build(depth) }
end

local function count(node)
  if node[1] then
    return 1 + count(node[1]) + count(node[2])
  end
  return 1
end

local max = tonumber(arg[1]) or 12
local long_lived = build(max)
local total = 0
for depth = 4, max, 2 do
  local trees = 1 << (max - depth + 4)
  for _ = 1, trees do
    total = total + count(build(depth))
  end
end
print(total + count(long_lived))
