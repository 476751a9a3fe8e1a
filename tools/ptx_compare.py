"""Compare the PTX of two builds kernel by kernel, once names and labels are normalised: a change that
only moves, renames or reformats code leaves every kernel's instructions the same.

    python tools/ptx_compare.py OLD.ptx NEW.ptx [NEW2.ptx ...] --rename OLD_NAME=NEW_NAME ...

Kernels are matched by their demangled names, with the renames applied to the old ones. Prints
one line per kernel: same, or differs (with the first differing instruction)."""
import argparse
import re
import subprocess


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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("old")
    p.add_argument("new", nargs="+")
    p.add_argument("--rename", nargs="*", default=[],
                   help="OLD=NEW: a regular expression in the old demangled names and its replacement")
    args = p.parse_args()
    old = kernels(args.old)
    new = {}
    for path in args.new:
        new.update(kernels(path))
    renames = [pair.split("=") for pair in args.rename]
    same = 0
    for name, body in old.items():
        target = name
        for a, b in renames:
            target = re.sub(a, b, target)
        if target not in new:
            print(f"missing in new: {name} (looked for {target})")
            continue
        if new[target] == body:
            same += 1
            print(f"same     {name} -> {target}")
        else:
            a, b = body.splitlines(), new[target].splitlines()
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"DIFFERS  {name} -> {target}: {len(a)} vs {len(b)} lines; first at {first}: "
                  f"{a[first] if first < len(a) else ''!r} vs {b[first] if first < len(b) else ''!r}")
    print(f"{same} of {len(old)} kernels the same")


if __name__ == "__main__":
    main()
