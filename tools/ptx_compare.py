"""Compare the PTX of two builds kernel by kernel, once names and labels are normalised: a change that
only moves, renames or reformats code leaves every kernel's instructions the same.

    python tools/ptx_compare.py OLD.ptx NEW.ptx [NEW2.ptx ...] --rename OLD_NAME=NEW_NAME ...

Kernels are matched by their demangled names, with the renames applied to the old ones. Prints
one line per kernel: same, differs (with the first differing instruction), missing in new, or only
in new. Exits 1 unless every kernel is the same, in both builds; a file that holds no kernel (.entry)
is an error, as it is not PTX, or not the file meant."""
import argparse
import re
import subprocess
import sys


def demangle(name):
    """The kernel's C++ name without its parameter list, e.g. flash2_mma::forward<__half, 64>."""
    full = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
    return re.sub(r"^void ", "", full.split("(")[0])


def kernels(path):
    """{demangled name: normalised body} of every .entry in a PTX file."""
    text = open(path).read()
    found = {}
    for match in re.finditer(r"\.entry (\S+)\(", text):
        name, start = match.group(1), match.start()
        end = text.find("\n}\n", start)
        body = text[start:end]
        body = body.replace(name, "KERNEL")
        body = re.sub(r"\$L__\w+?(\d+)_(\d+)", r"$L_\2", body)  # labels carry the function's index
        body = "\n".join(line for line in body.splitlines()
                         if not line.strip().startswith((".loc", ".file", "//")) and line.strip())
        found[demangle(name)] = body
    return found


def rename(text):
    """An argparse type: OLD=NEW, OLD a regular expression, as (compiled OLD, NEW)."""
    old, equals, new = text.partition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"{text!r} is not OLD=NEW")
    try:
        return re.compile(old), new
    except re.error as error:
        raise argparse.ArgumentTypeError(f"{old!r} is not a regular expression: {error}") from None


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("old")
    p.add_argument("new", nargs="+")
    p.add_argument("--rename", nargs="*", type=rename, default=[],
                   help="OLD=NEW: a regular expression in the old demangled names and its replacement")
    args = p.parse_args(argv)
    found = {}
    for path in [args.old, *args.new]:
        try:
            found[path] = kernels(path)
        except (OSError, UnicodeDecodeError) as error:
            p.error(f"{path}: {getattr(error, 'strerror', None) or error}")
        if not found[path]:
            p.error(f"{path}: no kernel (.entry) in it: not PTX?")
    old = found[args.old]
    new = {name: body for path in args.new for name, body in found[path].items()}
    same, matched = 0, set()
    for name, body in old.items():
        target = name
        for pattern, replacement in args.rename:
            target = pattern.sub(replacement, target)
        if target not in new:
            print(f"missing in new: {name} (looked for {target})")
            continue
        matched.add(target)
        if new[target] == body:
            same += 1
            print(f"same     {name} -> {target}")
        else:
            a, b = body.splitlines(), new[target].splitlines()
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"DIFFERS  {name} -> {target}: {len(a)} vs {len(b)} lines; first at {first}: "
                  f"{a[first] if first < len(a) else ''!r} vs {b[first] if first < len(b) else ''!r}")
    added = [name for name in new if name not in matched]
    for name in added:  # a kernel the change added: not the same build either
        print(f"only in new: {name}")
    print(f"{same} of {len(old)} kernels the same" + (f"; {len(added)} only in new" if added else ""))
    return 0 if same == len(old) and not added else 1


if __name__ == "__main__":
    sys.exit(main())
