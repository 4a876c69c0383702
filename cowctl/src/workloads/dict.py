# A dict churn in Python: the second real program checkpointed at 100 Hz (README, issue 15).
# Usage: python3 dict.py [OPS]. Prints a checksum of the final dict.
#
# 20 000 keys, each holding a list of 8 integers; every operation rebuilds one key's list (a
# new object, the old one freed), 90 % of them on a hot 5 % of the keys; every 1 000
# operations the dict is filtered into a new one and refilled. Deterministic (own LCG).
import sys

ops = int(sys.argv[1]) if len(sys.argv) > 1 else 300_000
n_keys = 20_000
hot = n_keys // 20
store = {f"key:{i}": [i] * 8 for i in range(n_keys)}
seed = 42


def rnd():
    global seed
    seed = (seed * 1103515245 + 12345) % 2147483648
    return seed >> 4


for i in range(1, ops + 1):
    r = rnd()
    k = f"key:{r % hot if r % 10 else r % n_keys}"
    store[k] = [x + 1 for x in store.get(k, [0] * 8)]
    if i % 1000 == 0:
        store = {k: v for k, v in store.items() if v[0] % 97 != i % 97}
        for j in range(n_keys):
            store.setdefault(f"key:{j}", [j] * 8)

print(sum(v[0] + v[7] for v in store.values()))
