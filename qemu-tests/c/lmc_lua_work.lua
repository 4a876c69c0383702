-- The workload of lmc_lua.c: setup() builds a state, work() changes it (tables, strings,
-- closures, garbage collection) and emits what it sees. Run after each rollback, work() must
-- emit the same again.
state = {}
counter = 0

function setup()
  for i = 1, 50000 do state[i] = { i, tostring(i * 7) } end
end

local function tree(d)
  if d == 0 then return {} end
  return { tree(d - 1), tree(d - 1) }
end

local function count(t)
  if not t[1] then return 1 end
  return 1 + count(t[1]) + count(t[2])
end

function work()
  emit(count(tree(12)))
  for i = 1, #state, 7 do
    state[i][2] = state[i][2] .. "x"
    counter = counter + #state[i][2]
  end
  emit(counter)
  local parts = {}
  for i = 1, 3000 do parts[#parts + 1] = string.format("%d:%s", i, state[i][2]) end
  emit(#table.concat(parts, ","))
  for i = 1, 20000 do state[#state + 1] = { i, string.rep("y", i % 17) } end
  emit(#state)
  collectgarbage()
  emit(string.format("%.6f", math.sin(counter)))
  local words = {}
  for w in string.gmatch(string.rep("alpha beta gamma ", 500), "%a+") do
    words[w] = (words[w] or 0) + 1
  end
  emit(words.alpha .. " " .. words.beta .. " " .. words.gamma)
end
