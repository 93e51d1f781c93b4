#!/usr/bin/env python3
"""Side-by-side boot timelines: where one guest boot spends time that another does not.

    scripts/boot-timeline.py A.log B.log [--top N] [--host]

Each log is a guest serial console with printk timestamps ("[   1.234567] ..."), optionally
prefixed by the host's arrival time in ms ("12345 [   1.234567] ..."; `LOGS=DIR
scripts/bench-boot.sh` writes them so). The two boots are aligned on the kernel messages they
share (numbers, addresses and device names blanked, difflib's longest matching runs); for each
stretch between two aligned messages it prints the time each boot took and the difference,
largest differences first, with the messages that only one side printed in that stretch (that is
usually the reason). --host uses the host arrival times instead of printk's clock (includes
what happens before the kernel's clock starts and the console's own cost).
"""
import argparse
import difflib
import re
import sys

LINE = re.compile(r"^(?:(\d+(?:\.\d+)?) )?\[\s*(\d+\.\d+)\] (.*)$")
BLANK = re.compile(r"0x[0-9a-fA-F]+|[0-9a-fA-F]{6,}|\d+")


def parse(path, host):
    """(time in ms, raw message, normalized message) per printk line."""
    out = []
    with open(path, errors="replace") as f:
        for raw in f:
            m = LINE.match(raw.rstrip("\r\n"))
            if not m:
                continue
            if host and m.group(1) is None:
                sys.exit(f"boot-timeline: {path} has no host timestamps (--host needs LOGS= logs)")
            t = float(m.group(1)) if host else float(m.group(2)) * 1000.0
            msg = m.group(3)
            out.append((t, msg, BLANK.sub("#", msg)[:72]))
    if not out:
        sys.exit(f"boot-timeline: {path}: no printk-timestamped lines")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--names", default="A,B", help="labels for the two logs, e.g. vmm,ch")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--host", action="store_true", help="use host arrival times")
    args = ap.parse_args()
    na, nb = (args.names.split(",") + ["B"])[:2]
    a, b = parse(args.a, args.host), parse(args.b, args.host)
    sm = difflib.SequenceMatcher(None, [x[2] for x in a], [x[2] for x in b], autojunk=False)
    pairs = [(blk.a + k, blk.b + k) for blk in sm.get_matching_blocks() for k in range(blk.size)]
    if len(pairs) < 2:
        sys.exit("boot-timeline: the logs share fewer than two messages")
    segs = []
    for (ia0, ib0), (ia1, ib1) in zip(pairs, pairs[1:]):
        da, db = a[ia1][0] - a[ia0][0], b[ib1][0] - b[ib0][0]
        only_a = [x[1] for x in a[ia0 + 1 : ia1]]
        only_b = [x[1] for x in b[ib0 + 1 : ib1]]
        segs.append((da - db, da, db, a[ia0][1], a[ia1][1], only_a, only_b))
    fa, fb = pairs[0], pairs[-1]
    span_a, span_b = a[fb[0]][0] - a[fa[0]][0], b[fb[1]][0] - b[fa[1]][0]
    clock = "host arrival" if args.host else "printk"
    print(f"{len(pairs)} shared messages of {len(a)} ({na}) and {len(b)} ({nb}); {clock} clock")
    print(f"first shared message at {na} {a[fa[0]][0] / 1000:.3f} s, {nb} {b[fa[1]][0] / 1000:.3f} s")
    print(f"last shared message at  {na} {a[fb[0]][0] / 1000:.3f} s, {nb} {b[fb[1]][0] / 1000:.3f} s")
    print(f"between them: {na} {span_a / 1000:.3f} s, {nb} {span_b / 1000:.3f} s,"
          f" difference {(span_a - span_b) / 1000:+.3f} s")
    print(f"\nlargest differences ({na} - {nb}), ms; the stretch starts after the first message:")
    print(f"| {na} ms | {nb} ms | {na} - {nb} | from | to | only in {na} | only in {nb} |")
    print("|---:|---:|---:|---|---|---|---|")

    def cell(msgs):
        if not msgs:
            return ""
        s = "; ".join(m[:60] for m in msgs[:3])
        return s + (f" (+{len(msgs) - 3} more)" if len(msgs) > 3 else "")

    for d, da, db, m0, m1, oa, ob in sorted(segs, key=lambda s: -abs(s[0]))[: args.top]:
        print(f"| {da:.0f} | {db:.0f} | {d:+.0f} | {m0[:50]} | {m1[:50]} | {cell(oa)} | {cell(ob)} |"
              .replace("\\", "/"))


if __name__ == "__main__":
    main()
