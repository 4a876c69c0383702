# Delorean's gdb commands: time travel over a recording served by `cowctl gdbserver`.
# Loaded by `cowctl debug`. Every command talks to the server with `monitor ...` and then makes
# gdb forget what it cached about the previous instant.
import gdb


def _monitor(cmd):
    out = gdb.execute("monitor " + cmd, to_string=True).strip()
    if out.startswith("error:"):
        raise gdb.GdbError(out[len("error: "):])
    return out


def _range():
    first, last = _monitor("range").split()
    return int(first), int(last)


def _current():
    return int(_monitor("current"))


def _select_program_frame():
    """Selects the innermost frame in the program itself (not in libc or the preload's
    allocator), so that expressions are evaluated in the program's language and scope."""
    exe = gdb.current_progspace().filename
    try:
        f = gdb.newest_frame()
        while f is not None:
            sal = f.find_sal()
            if sal.symtab is not None and sal.symtab.objfile.filename == exe:
                f.select()
                return
            f = f.older()
    except gdb.error:
        pass


def _refresh(line=""):
    """Re-reads the target after a goto; selects the thread the checkpoint is about (a crash
    or a breakpoint names it: "... thread TID)"), else the first one."""
    # The selected thread may not exist at this checkpoint: gdb then fails to re-read its
    # registers, until the thread list of this instant is fetched.
    for cmd in ("maintenance flush register-cache", "maintenance flush dcache", "info threads"):
        try:
            gdb.execute(cmd, to_string=True)
        except gdb.error:
            pass
    event_tid = None
    if " thread " in line:
        try:
            event_tid = int(line.rsplit(" thread ", 1)[1].rstrip(")"))
        except ValueError:
            event_tid = None
    selected = False
    if event_tid is not None:
        for t in gdb.selected_inferior().threads():
            if t.ptid[1] == event_tid:
                t.switch()
                selected = True
    if not selected:
        try:
            gdb.execute("thread 1", to_string=True)
        except gdb.error:
            pass
    _select_program_frame()


def _goto(n, quiet=False):
    line = _monitor("goto %d" % n)
    _refresh(line)
    if not quiet:
        print(line)
        try:
            gdb.execute("frame", to_string=False)
        except gdb.error:
            pass


def _parse_range(text):
    first, last = _range()
    if not text:
        return first, last
    if "-" in text:
        a, b = text.split("-", 1)
        # A range is clamped to the recording ("1-1000000" means "all of them").
        return max(int(a) if a else first, first), min(int(b) if b else last, last)
    n = int(text)
    return n, n


def _true_at(expr, n):
    _goto(n, quiet=True)
    try:
        return bool(gdb.parse_and_eval(expr))
    except gdb.error:
        return False


class Delorean(gdb.Command):
    """Time travel over a Delorean recording.

delorean list [A-B]             checkpoints (number, time, why)
delorean goto N                 everything gdb shows is now as of checkpoint N
delorean next | prev | present  checkpoint N+1, N-1, the last one
delorean search EXPR [--linear] [--in A-B]
                                the first checkpoint where EXPR is true (binary search:
                                EXPR must stay true once it became true; --linear checks each)
delorean when EXPR|ADDR [LEN]   checkpoints at which those bytes changed (from the page index)
delorean for A-B [if EXPR] [do CMD[; CMD...]]
                                run CMDs at each checkpoint (where EXPR holds)"""

    def __init__(self):
        super().__init__("delorean", gdb.COMMAND_USER, prefix=True)


class DList(gdb.Command):
    """delorean list [A-B]: checkpoints."""

    def __init__(self):
        super().__init__("delorean list", gdb.COMMAND_USER)

    def invoke(self, arg, from_tty):
        a, b = _parse_range(arg.strip())
        print(_monitor("list %d %d" % (a, b)))


class DGoto(gdb.Command):
    """delorean goto N: move to checkpoint N."""

    def __init__(self):
        super().__init__("delorean goto", gdb.COMMAND_USER)

    def invoke(self, arg, from_tty):
        _goto(int(arg))


class DStep(gdb.Command):
    def __init__(self, name, delta):
        self.delta = delta
        super().__init__("delorean " + name, gdb.COMMAND_USER)

    def invoke(self, arg, from_tty):
        first, last = _range()
        if self.delta == 0:
            _goto(last)
            return
        n = _current() + self.delta
        if n < first or n > last:
            raise gdb.GdbError("no checkpoint %d (the recording has %d-%d)" % (n, first, last))
        _goto(n)


class DSearch(gdb.Command):
    """delorean search EXPR [--linear] [--in A-B]: the first checkpoint where EXPR is true."""

    def __init__(self):
        super().__init__("delorean search", gdb.COMMAND_USER)

    def invoke(self, arg, from_tty):
        words = arg.split()
        linear = "--linear" in words
        words = [w for w in words if w != "--linear"]
        rng = None
        if "--in" in words:
            at = words.index("--in")
            if at + 1 >= len(words):
                raise gdb.GdbError("usage: delorean search EXPR [--linear] [--in A-B]")
            rng = words[at + 1]
            del words[at:at + 2]
        expr = " ".join(words)
        if not expr:
            raise gdb.GdbError("usage: delorean search EXPR [--linear] [--in A-B]")
        lo, hi = _parse_range(rng)
        found = None
        if linear:
            for n in range(lo, hi + 1):
                if _true_at(expr, n):
                    found = n
                    break
        else:
            if _true_at(expr, hi):
                a, b = lo, hi  # invariant: true at b; false before a
                while a < b:
                    mid = (a + b) // 2
                    if _true_at(expr, mid):
                        b = mid
                    else:
                        a = mid + 1
                found = b
        if found is None:
            _goto(_current(), quiet=True)
            raise gdb.GdbError("%s is never true in checkpoints %d-%d" % (expr, lo, hi))
        _goto(found)


class DWhen(gdb.Command):
    """delorean when EXPR|ADDR [LEN]: checkpoints at which those bytes changed."""

    def __init__(self):
        super().__init__("delorean when", gdb.COMMAND_USER)

    def invoke(self, arg, from_tty):
        arg = arg.strip()
        if not arg:
            raise gdb.GdbError("usage: delorean when EXPR|ADDR [LEN]")
        parts = arg.rsplit(None, 1)
        length = None
        if len(parts) == 2 and parts[1].isdigit():
            arg, length = parts[0], int(parts[1])
        v = gdb.parse_and_eval(arg)
        if v.type.strip_typedefs().code == gdb.TYPE_CODE_PTR and length is not None:
            addr = int(v)
        elif v.address is not None:
            addr = int(v.address)
            length = length or v.type.sizeof
        else:
            addr = int(v)
            length = length or 1
        print(_monitor("when %d %d" % (addr, length)))


class DFor(gdb.Command):
    """delorean for A-B [if EXPR] [do CMD[; CMD...]]: run commands at each checkpoint."""

    def __init__(self):
        super().__init__("delorean for", gdb.COMMAND_USER)

    def invoke(self, arg, from_tty):
        text = arg.strip()
        cmds = []
        if " do " in " " + text:
            text, do = (" " + text).split(" do ", 1)
            cmds = [c.strip() for c in do.split(";") if c.strip()]
        cond = None
        if " if " in " " + text:
            text, cond = (" " + text).split(" if ", 1)
        a, b = _parse_range(text.strip())
        for n in range(a, b + 1):
            if cond is not None and not _true_at(cond, n):
                continue
            _goto(n, quiet=True)
            print(_monitor("list %d %d" % (n, n)))
            for c in cmds:
                gdb.execute(c)


Delorean()
DList()
DGoto()
DStep("next", 1)
DStep("prev", -1)
DStep("present", 0)
DSearch()
DWhen()
DFor()
