#!/usr/bin/python3
"""fio benchmark of the VMM's virtio-blk, with the IOMMU off, lazy and strict, with and without
interrupt remapping, and the same fio jobs under QEMU. Driven by scripts/bench-fio.sh (which
builds the VMM and the guest); Python 3 standard library only.

  bench-fio.py run --guest DIR --vmm BIN --out DIR [--runtime S] [--transports mmio,pci]
               [--iommu off,lazy,strict] [--remap off,on] [--qemu|--no-qemu] [--repeat N]
               [--fio ARGS] [--ab BASE_JSON]
  bench-fio.py compare BASE_JSON NEW_JSON      the A/B verdict of two result files

One guest boot per configuration (and per repeat): the guest agent's `fio` check runs the jobs
on /dev/vda; the VMM's counters at the check's start and end marks give the per-I/O figures
(exact, even where the guest is emulated): register exits, interrupts, MAP/UNMAP requests and
CPU time of the VMM's threads. Outputs in --out: results.json, results.md, results.png, and
each run's console + stderr in logs/.
"""

import argparse
import itertools
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# The default jobs: 4 KiB random read and write, libaio, iodepth 32, then psync iodepth 1 for
# latency; time-based, one after the other (stonewall), JSON output.
DEFAULT_JOBS = (
    "--filename=/dev/vda --direct=1 --bs=4k --time_based --runtime={rt} --output-format=json "
    "--name=randread --rw=randread --ioengine=libaio --iodepth=32 "
    "--name=randwrite --stonewall --rw=randwrite --ioengine=libaio --iodepth=32 "
    "--name=lat --stonewall --rw=randread --ioengine=psync --iodepth=1"
)
# Metrics the A/B mode compares, and which direction is better.
AB_METRICS = {
    "iops": "higher",
    "clat_p50_us": "lower",
    "clat_p99_us": "lower",
    "disk_exits_per_io": "lower",
    "irqs_per_io": "lower",
    "map_per_io": "lower",
    "unmap_per_io": "lower",
    "vmm_cpu_us_per_io": "lower",
}
AB_P = 0.01
AB_MIN_CHANGE = 0.05
AB_MIN_RUNS = 5


def log(msg):
    print(f"bench-fio: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Configurations


def vmm_configs(transports, iommus, remaps):
    for t, i, r in itertools.product(transports, iommus, remaps):
        yield {"vmm": "vmm", "transport": t, "iommu": i, "remap": r,
               "name": f"vmm {t} iommu={i} remap={r}"}


def qemu_configs(iommus, remaps):
    """QEMU equivalents (virtio-blk-pci): no IOMMU, virtio-iommu-pci lazy/strict, and
    intel-iommu with interrupt remapping (split irqchip) with identity DMA (iommu=pt)."""
    for i in iommus:
        yield {"vmm": "qemu", "transport": "pci", "iommu": i, "remap": "off",
               "name": f"qemu pci iommu={i} remap=off"}
    if "on" in remaps and "off" in iommus:
        yield {"vmm": "qemu", "transport": "pci", "iommu": "off", "remap": "on",
               "name": "qemu pci iommu=off remap=on"}


def strict_arg(iommu):
    return {"off": [], "lazy": ["iommu.strict=0"], "strict": ["iommu.strict=1"]}[iommu]


def command(cfg, a, disk, stats_json, fio_args):
    cmdline = ["console=ttyS0", "panic=-1", "guest.checks=fio",
               "guest.fio=" + "+".join(fio_args.split())] + strict_arg(cfg["iommu"])
    cmdline += a.host_cmdline
    kernel = os.path.join(a.guest, "vmlinux")
    initrd = os.path.join(a.guest, "initramfs-fio.cpio")
    if cfg["vmm"] == "vmm":
        iommu = {("off", "off"): None, ("off", "on"): "intremap",
                 ("lazy", "off"): "dma", ("strict", "off"): "dma",
                 ("lazy", "on"): "on", ("strict", "on"): "on"}[(cfg["iommu"], cfg["remap"])]
        d = disk + ("" if cfg["transport"] == "mmio" else f",transport={cfg['transport']}")
        cmd = [a.vmm, "--kernel", kernel, "--initrd", initrd, "--cpus", str(a.cpus),
               "--memory", "256", "--disk", d, "--stats-json", stats_json,
               "--timeout", str(a.timeout), "--cmdline", " ".join(cmdline)]
        if iommu:
            cmd.insert(1, f"--iommu={iommu}")
        return cmd
    machine = "q35,kernel-irqchip=split" if cfg["remap"] == "on" else "q35"
    cmd = ["qemu-system-x86_64", "-enable-kvm", "-M", machine,
           "-cpu", "qemu64,vendor=GenuineIntel,+x2apic,-cx16", "-m", "256", "-smp", str(a.cpus),
           "-nodefaults", "-vga", "none", "-display", "none", "-serial", "stdio",
           "-monitor", "none", "-no-reboot", "-kernel", kernel, "-initrd", initrd,
           "-drive", f"file={disk},if=none,id=d0,format=raw,cache=none"]
    blk = "virtio-blk-pci,drive=d0,disable-legacy=on"
    if cfg["iommu"] != "off":
        cmd += ["-device", "virtio-iommu-pci"]
        blk += ",iommu_platform=on"
    if cfg["remap"] == "on":
        cmd += ["-device", "intel-iommu,intremap=on"]
        cmdline.append("iommu=pt")
    cmd += ["-device", blk, "-append", " ".join(cmdline)]
    return cmd


# ---------------------------------------------------------------------------------------------
# One run


def fio_json(serial_lines):
    text = "\n".join(line.split("GUEST_FIO ", 1)[1] for line in serial_lines
                     if "GUEST_FIO " in line)
    start = text.find("{")
    end = text.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        return json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None


def job_figures(fio):
    jobs = {}
    for j in fio.get("jobs", []):
        # The job's direction: the side that did I/O.
        side = "write" if j["write"]["total_ios"] > j["read"]["total_ios"] else "read"
        s = j[side]
        pct = s.get("clat_ns", {}).get("percentile", {})
        jobs[j["jobname"]] = {
            "rw": side,
            "ios": s["total_ios"],
            "iops": s["iops"],
            "bw_kib_s": s["bw"],
            "clat_p50_us": pct.get("50.000000", 0) / 1000,
            "clat_p99_us": pct.get("99.000000", 0) / 1000,
        }
    return jobs


def run_one(cfg, a, fio_args, workdir):
    disk = os.path.join(workdir, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(128 << 20)
    stats_json = os.path.join(workdir, "stats.json")
    if os.path.exists(stats_json):
        os.unlink(stats_json)
    cmd = command(cfg, a, disk, stats_json, fio_args)
    log(f"{cfg['name']}: {' '.join(cmd)}")
    start = time.time()
    # CPU time of the whole VMM process (boot included), from the kernel's child accounting.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, text=True, errors="replace")
    out, err = p.communicate(timeout=a.timeout + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = {"config": cfg, "exit_code": p.returncode, "wall_s": round(time.time() - start, 1),
           "process_cpu_s": round(after.ru_utime + after.ru_stime
                                  - before.ru_utime - before.ru_stime, 2)}
    lines = out.splitlines()
    # The console and the VMM's stderr, for looking into a run afterwards.
    logs = os.path.join(a.out, "logs")
    os.makedirs(logs, exist_ok=True)
    log_name = re.sub(r"[^A-Za-z0-9=.-]+", "_", cfg["name"]) + f"-{len(os.listdir(logs))}.log"
    with open(os.path.join(logs, log_name), "w") as f:
        f.write(out + "\n--- stderr ---\n" + err)
    res["log"] = os.path.join("logs", log_name)
    fio = fio_json(lines)
    if fio is None:
        res["error"] = (f"no fio JSON (exit {p.returncode}): "
                        + " | ".join(err.strip().splitlines()[-2:]))
        return res
    res["jobs"] = job_figures(fio)
    ios = sum(j["ios"] for j in res["jobs"].values())
    res["ios"] = ios
    if cfg["vmm"] != "vmm" or not os.path.exists(stats_json):
        return res
    stats = json.load(open(stats_json))
    marks = {}
    for line in lines:
        m = re.search(r"GUEST_MARK (\d+) (\S+)", line)
        if m:
            marks[m.group(2)] = int(m.group(1))
    by_id = {m["id"]: m["counters"] for m in stats.get("marks", [])}
    c0, c1 = by_id.get(marks.get("fio.start")), by_id.get(marks.get("fio.end"))
    if not c0 or not c1 or ios == 0:
        res["error"] = "no fio marks in --stats-json"
        return res

    def delta(name):
        return c1.get(name, 0) - c0.get(name, 0)

    reg_exits = sum(delta(k) for k in c1 if k.startswith(("mmio_exits.", "pio_exits."))
                    and not k.endswith((".serial", ".marker")))
    res["per_io"] = {
        "disk_exits_per_io": delta("mmio_exits.disk0") / ios,
        "register_exits_per_io": reg_exits / ios,
        "irqs_per_io": delta("irqs.disk0") / ios,
        "map_per_io": delta("iommu.map") / ios,
        "unmap_per_io": delta("iommu.unmap") / ios,
        "vmm_cpu_us_per_io": delta("cpu_ms.vmm") * 1000 / ios,
        "vcpu_cpu_us_per_io": delta("cpu_ms.vcpus") * 1000 / ios,
        "routes_rebuilt": delta("routes_rebuilt"),
        "signal_msi": delta("signal_msi"),
    }
    res["boot_to_init_ms"] = stats.get("boot_to_init_ms")
    res["overhead"] = stats.get("overhead")
    return res


# ---------------------------------------------------------------------------------------------
# Summaries


def summary(runs):
    """Medians over the repeats of one configuration, and the per-run samples."""
    ok = [r for r in runs if "jobs" in r]
    s = {"runs": len(runs), "ok_runs": len(ok), "samples": {}}
    if not ok:
        s["error"] = runs[0].get("error", "failed") if runs else "not run"
        return s

    def put(key, values):
        s["samples"][key] = values
        s[key] = statistics.median(values)

    for job in ok[0]["jobs"]:
        for k in ("iops", "bw_kib_s", "clat_p50_us", "clat_p99_us"):
            put(f"{job}.{k}", [r["jobs"].get(job, {}).get(k, 0) for r in ok])
    if all("per_io" in r for r in ok):
        for k in ok[0]["per_io"]:
            put(k, [r["per_io"][k] for r in ok])
    if all("process_cpu_s" in r for r in ok):
        put("process_cpu_s", [r["process_cpu_s"] for r in ok])
    return s


def fmt(v, digits=2):
    if v is None:
        return "–"
    if isinstance(v, float) and not v.is_integer():
        return f"{v:.{digits}f}"
    return str(int(v))


def markdown(results):
    rows = ["| configuration | randread IOPS | randwrite IOPS | read MiB/s | write MiB/s "
            "| psync clat p50 / p99 (µs) | disk exits/IO | reg. exits/IO | IRQs/IO | MAP/IO "
            "| UNMAP/IO | VMM CPU µs/IO | vCPU CPU µs/IO | randread IOPS vs QEMU |",
            "|" + "---|" * 14]
    qemu = {(s["config"]["iommu"], s["config"]["remap"]): s
            for s in results["configs"] if s["config"]["vmm"] == "qemu"}
    for s in results["configs"]:
        cfg = s["config"]
        if "error" in s:
            rows.append(f"| {cfg['name']} | {s['error']} |" + " |" * 13)
            continue
        q = qemu.get((cfg["iommu"], cfg["remap"]))
        ratio = "–"
        if cfg["vmm"] == "vmm" and q and "randread.iops" in q and q["randread.iops"]:
            ratio = f"{s['randread.iops'] / q['randread.iops']:.2f}"
        rows.append("| " + " | ".join([
            cfg["name"], fmt(s.get("randread.iops"), 1), fmt(s.get("randwrite.iops"), 1),
            fmt(s.get("randread.bw_kib_s", 0) / 1024, 3), fmt(s.get("randwrite.bw_kib_s", 0) / 1024, 3),
            f"{fmt(s.get('lat.clat_p50_us'), 0)} / {fmt(s.get('lat.clat_p99_us'), 0)}",
            fmt(s.get("disk_exits_per_io"), 3), fmt(s.get("register_exits_per_io"), 3),
            fmt(s.get("irqs_per_io"), 3), fmt(s.get("map_per_io"), 3),
            fmt(s.get("unmap_per_io"), 3), fmt(s.get("vmm_cpu_us_per_io"), 0),
            fmt(s.get("vcpu_cpu_us_per_io"), 0), ratio]) + " |")
    return "\n".join(rows) + "\n"


def chart(results, png):
    """IOPS and register exits per I/O by configuration, with gnuplot (gnuplot-nox)."""
    if not shutil.which("gnuplot"):
        log("gnuplot not installed (apt-get install gnuplot-nox): no PNG")
        return False
    data = tempfile.NamedTemporaryFile("w", suffix=".dat", delete=False)
    for i, s in enumerate(results["configs"]):
        name = s["config"]["name"].replace(" ", "\\n")
        data.write(f'{i} "{name}" {s.get("randread.iops", 0)} {s.get("randwrite.iops", 0)} '
                   f'{s.get("disk_exits_per_io", 0)} {s.get("irqs_per_io", 0)} '
                   f'{s.get("map_per_io", 0) + s.get("unmap_per_io", 0)}\n')
    data.close()
    script = f"""
set terminal pngcairo size 1400,900 noenhanced font ",9"
set output "{png}"
set multiplot layout 2,1 title "bench-fio: {results['runtime_s']} s per job, {results['repeat']} run(s) per configuration"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set grid ytics
set bmargin 6
set offsets 0, 0, graph 0.15, 0
set yrange [0:*]
set xtics rotate by 0 font ",7"
set ylabel "IOPS (4 KiB, iodepth 32)"
plot "{data.name}" using 3:xtic(2) title "randread", "" using 4 title "randwrite"
set ylabel "per I/O (fio window)"
plot "{data.name}" using 5:xtic(2) title "disk register exits", "" using 6 title "interrupts", "" using 7 title "MAP+UNMAP"
unset multiplot
"""
    r = subprocess.run(["gnuplot"], input=script, text=True, capture_output=True)
    if r.returncode != 0 and "pngcairo" in r.stderr:
        r = subprocess.run(["gnuplot"], input=script.replace("pngcairo", "png"), text=True,
                           capture_output=True)
    os.unlink(data.name)
    if r.returncode != 0:
        log(f"gnuplot failed: {r.stderr.strip()}")
    return r.returncode == 0


# ---------------------------------------------------------------------------------------------
# A/B: exact permutation test of the difference of means, as Firecracker's A/B tool does


def permutation_p(a, b):
    """Two-sided p-value of mean(b) - mean(a) under exact permutation (all splits)."""
    observed = abs(statistics.mean(b) - statistics.mean(a))
    pooled = a + b
    n = len(a)
    total = hits = 0
    for idx in itertools.combinations(range(len(pooled)), n):
        s = set(idx)
        x = [pooled[i] for i in s]
        y = [pooled[i] for i in range(len(pooled)) if i not in s]
        total += 1
        if abs(statistics.mean(y) - statistics.mean(x)) >= observed - 1e-12:
            hits += 1
    return hits / total


def compare(base, new):
    """Rows (config, metric, base, new, change, p, verdict); a change is flagged only at
    p < 0.01 and |change| >= 5 %, with at least 5 runs per side."""
    out = []
    bmap = {s["config"]["name"]: s for s in base["configs"]}
    for s in new["configs"]:
        b = bmap.get(s["config"]["name"])
        if not b:
            continue
        for key, va in sorted(s.get("samples", {}).items()):
            metric = key.split(".")[-1]
            if metric not in AB_METRICS or key not in b.get("samples", {}):
                continue
            xa, xb = b["samples"][key], va
            ma, mb = statistics.mean(xa), statistics.mean(xb)
            change = (mb - ma) / ma if ma else (0.0 if mb == ma else math.inf)
            if len(xa) < AB_MIN_RUNS or len(xb) < AB_MIN_RUNS:
                verdict, p = f"too few runs (< {AB_MIN_RUNS} per side)", None
            else:
                p = permutation_p(xa, xb)
                if p < AB_P and abs(change) >= AB_MIN_CHANGE:
                    better = (change > 0) == (AB_METRICS[metric] == "higher")
                    verdict = "IMPROVED" if better else "REGRESSED"
                else:
                    verdict = "no change"
            out.append((s["config"]["name"], key, ma, mb, change, p, verdict))
    return out


def print_compare(rows):
    print("| configuration | metric | base mean | new mean | change | p | verdict |")
    print("|---|---|---|---|---|---|---|")
    for name, key, ma, mb, ch, p, v in rows:
        print(f"| {name} | {key} | {ma:.4g} | {mb:.4g} | {ch * 100:+.1f} % | "
              f"{'–' if p is None else f'{p:.4f}'} | {v} |")
    return any(r[6] == "REGRESSED" for r in rows)


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--guest", required=True)
    r.add_argument("--vmm", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--runtime", type=int, default=10)
    r.add_argument("--transports", default="mmio")
    r.add_argument("--iommu", default="off,lazy,strict")
    r.add_argument("--remap", default="off,on")
    r.add_argument("--qemu", dest="qemu", action="store_true", default=None)
    r.add_argument("--no-qemu", dest="qemu", action="store_false")
    r.add_argument("--repeat", type=int, default=1)
    r.add_argument("--cpus", type=int, default=1)
    r.add_argument("--timeout", type=int, default=900)
    r.add_argument("--fio", default=None, help="fio arguments (replace the default jobs)")
    r.add_argument("--ab", default=None, help="compare with this base results.json")
    c = sub.add_parser("compare")
    c.add_argument("base")
    c.add_argument("new")
    a = ap.parse_args()
    if a.cmd == "compare":
        sys.exit(1 if print_compare(compare(json.load(open(a.base)), json.load(open(a.new))))
                 else 0)

    a.host_cmdline = []
    if os.path.exists("/sys/module/kvm_pvm"):
        a.host_cmdline = open(os.path.join(a.guest, "cmdline-pvm.txt")).read().split()
    fio_args = a.fio or DEFAULT_JOBS.format(rt=a.runtime)
    split = lambda v: [x for x in v.split(",") if x]  # noqa: E731
    configs = list(vmm_configs(split(a.transports), split(a.iommu), split(a.remap)))
    if a.qemu is None:
        a.qemu = shutil.which("qemu-system-x86_64") is not None
    if a.qemu:
        configs += list(qemu_configs(split(a.iommu), split(a.remap)))
    os.makedirs(a.out, exist_ok=True)
    results = {"runtime_s": a.runtime, "repeat": a.repeat, "cpus": a.cpus, "fio_args": fio_args,
               "host_pvm": bool(a.host_cmdline), "configs": [], "runs": []}
    with tempfile.TemporaryDirectory() as work:
        per_cfg = {c["name"]: [] for c in configs}
        # Repeats alternate configurations, so each sees the same host load.
        for _ in range(a.repeat):
            for cfg in configs:
                res = run_one(cfg, a, fio_args, work)
                log(f"{cfg['name']}: " + (res.get("error") or
                    f"{res['ios']} I/Os, " + ", ".join(
                        f"{k} {v['iops']:.1f} IOPS" for k, v in res["jobs"].items())))
                per_cfg[cfg["name"]].append(res)
                results["runs"].append(res)
    for cfg in configs:
        results["configs"].append(dict(summary(per_cfg[cfg["name"]]), config=cfg))
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = markdown(results)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(md)
    print(md)
    chart(results, os.path.join(a.out, "results.png"))
    log(f"wrote {a.out}/results.json, results.md, results.png")
    if a.ab:
        regressed = print_compare(compare(json.load(open(a.ab)), results))
        sys.exit(1 if regressed else 0)
    if any("error" in s for s in results["configs"] if s["config"]["vmm"] == "vmm"):
        sys.exit(1)


if __name__ == "__main__":
    main()
