-- string building: formatted records joined into large strings, upper-cased, searched and
-- rewritten (short-lived strings of every size, the string table, buffers).
-- Usage: strings.lua RECORDS
local records = tonumber(arg[1]) or 10000
local parts, total = {}, 0
for i = 1, records do
  parts[#parts + 1] = string.format("%d:%s;", i, string.rep(string.char(97 + i % 26), i % 17))
  if #parts == 500 or i == records then
    local joined = table.concat(parts)
    local shouted, vowels = joined:upper():gsub("[AEIOU]", "*")
    local _, fields = joined:gsub(";", ";")
    total = total + #shouted + vowels + fields
    parts = {}
  end
end
print(total)
