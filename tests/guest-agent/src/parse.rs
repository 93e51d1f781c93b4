//! Pure parsers (no I/O), unit-tested on the host.

/// The kernel command line, split like the kernel does: whitespace separates parameters,
/// double quotes group (and are removed), `key=value` or a bare `key`.
pub struct Cmdline {
    params: Vec<(String, Option<String>)>,
}

impl Cmdline {
    pub fn parse(text: &str) -> Cmdline {
        let mut params = Vec::new();
        let mut word = String::new();
        let mut in_word = false;
        let mut in_quotes = false;
        for c in text.chars() {
            match c {
                '"' => {
                    in_quotes = !in_quotes;
                    in_word = true;
                }
                c if c.is_whitespace() && !in_quotes => {
                    if in_word {
                        params.push(split_param(&word));
                        word.clear();
                        in_word = false;
                    }
                }
                c => {
                    word.push(c);
                    in_word = true;
                }
            }
        }
        if in_word {
            params.push(split_param(&word));
        }
        Cmdline { params }
    }

    /// The value of the last `key=value` (later parameters override earlier ones, as in the
    /// kernel). A bare `key` gives `Some("")`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_deref().unwrap_or(""))
    }

    /// `key` parsed as a number, `default` when absent; an error names the bad value.
    pub fn get_u64(&self, key: &str, default: u64) -> Result<u64, String> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| format!("bad {key}={v}")),
        }
    }

    /// `guest.checks=a,b,c` as a list (empty entries dropped).
    pub fn checks(&self) -> Vec<String> {
        self.get("guest.checks")
            .map(|v| {
                v.split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn split_param(word: &str) -> (String, Option<String>) {
    match word.split_once('=') {
        Some((k, v)) => (k.to_string(), Some(v.to_string())),
        None => (word.to_string(), None),
    }
}

/// Number of CPUs in a sysfs CPU list such as `0-1,3` (e.g. /sys/devices/system/cpu/online).
pub fn parse_cpu_list(text: &str) -> Result<usize, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(0);
    }
    let mut count = 0;
    for part in text.split(',') {
        let bad = || format!("bad CPU list entry {part:?}");
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (
                a.parse::<usize>().map_err(|_| bad())?,
                b.parse::<usize>().map_err(|_| bad())?,
            ),
            None => {
                let n = part.parse::<usize>().map_err(|_| bad())?;
                (n, n)
            }
        };
        if hi < lo {
            return Err(bad());
        }
        count += hi - lo + 1;
    }
    Ok(count)
}

/// One line of /proc/interrupts.
#[derive(Debug, PartialEq, Eq)]
pub struct IrqLine<'a> {
    /// Before the colon: the IRQ number or a name such as `NMI`, `LOC`, `ERR`.
    pub irq: &'a str,
    /// Per-CPU counts (fewer than the CPU count for lines like `ERR:`).
    pub counts: Vec<u64>,
    /// The rest: chip, hwirq/trigger and the action names, e.g. `IO-APIC   4-edge      ttyS0`.
    pub desc: &'a str,
}

impl IrqLine<'_> {
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Number of CPU columns announced by the header line of /proc/interrupts (`CPU0 CPU1 ...`).
pub fn interrupts_cpu_columns(header: &str) -> usize {
    header
        .split_whitespace()
        .filter(|w| w.starts_with("CPU"))
        .count()
}

/// Parses one /proc/interrupts line given the number of CPU columns; `None` for the header
/// or anything without a `name:` prefix.
pub fn parse_interrupts_line(line: &str, ncpus: usize) -> Option<IrqLine<'_>> {
    let (irq, mut rest) = line.split_once(':')?;
    let irq = irq.trim();
    if irq.is_empty() || irq.contains(char::is_whitespace) {
        return None;
    }
    let mut counts = Vec::new();
    while counts.len() < ncpus {
        let trimmed = rest.trim_start();
        let end = trimmed.find(char::is_whitespace).unwrap_or(trimmed.len());
        match trimmed[..end].parse::<u64>() {
            Ok(n) => {
                counts.push(n);
                rest = &trimmed[end..];
            }
            Err(_) => break,
        }
    }
    Some(IrqLine {
        irq,
        counts,
        desc: rest.trim(),
    })
}

/// The serial port's line of /proc/interrupts: the first whose actions name `ttyS0` or
/// `serial` (case-insensitive).
pub fn find_serial_irq(interrupts: &str) -> Option<IrqLine<'_>> {
    let mut lines = interrupts.lines();
    let ncpus = interrupts_cpu_columns(lines.next()?);
    lines
        .filter_map(|l| parse_interrupts_line(l, ncpus))
        .find(|l| {
            let d = l.desc.to_ascii_lowercase();
            d.contains("ttys0") || d.contains("serial")
        })
}

/// The message text of one /dev/kmsg record: `prio,seq,usec,flags[,...];text\n[ KEY=value\n]...`.
pub fn kmsg_text(record: &str) -> Option<&str> {
    let (_, rest) = record.split_once(';')?;
    Some(rest.split('\n').next().unwrap_or(""))
}

/// `guest.kmsg_grep=word1|word2`: true if `text` contains one of the words, ignoring case.
/// An empty pattern matches everything.
pub fn kmsg_matches(text: &str, pattern: &str) -> bool {
    let words: Vec<String> = pattern
        .split('|')
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    if words.is_empty() {
        return true;
    }
    let text = text.to_lowercase();
    words.iter().any(|w| text.contains(w.as_str()))
}

/// `guest.fio=--name=r+--rw=randread+...`: `+` separates the arguments.
pub fn fio_args(value: &str) -> Vec<String> {
    value
        .split('+')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// IOPS from one line of fio's terse output: `(job name, read IOPS, write IOPS)`.
/// Field numbers (0-based) from fio's stat.c, show_thread_status_terse_all(): 0 = terse
/// version, 2 = job name, 5.. = read status (41 fields in versions 3 and 4, 47 in version 5,
/// its IOPS third), then the write status in the same layout.
pub fn fio_terse_iops(line: &str) -> Option<(&str, u64, u64)> {
    let f: Vec<&str> = line.trim().split(';').collect();
    let ddir_fields = match *f.first()? {
        "3" | "4" => 41,
        "5" => 47,
        _ => return None,
    };
    let read_iops = 5 + 2;
    let write_iops = read_iops + ddir_fields;
    if f.len() <= write_iops {
        return None;
    }
    Some((
        f[2],
        f[read_iops].parse().ok()?,
        f[write_iops].parse().ok()?,
    ))
}

/// Replaces line breaks so a value stays on its `GUEST_FACT` line.
pub fn one_line(s: &str) -> String {
    s.trim_end_matches(['\n', '\r']).replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_basic() {
        let c = Cmdline::parse(
            "console=ttyS0 earlyprintk=serial panic=-1 emul_quirks guest.checks=cpus,,disk \
             guest.disk_mib=8\n",
        );
        assert_eq!(c.get("console"), Some("ttyS0"));
        assert_eq!(c.get("emul_quirks"), Some(""));
        assert_eq!(c.get("guest.disk_mib"), Some("8"));
        assert_eq!(c.get("guest.disk"), None);
        assert_eq!(c.checks(), vec!["cpus", "disk"]);
        assert_eq!(c.get_u64("guest.disk_mib", 1), Ok(8));
        assert_eq!(c.get_u64("guest.disk_seed", 1), Ok(1));
        assert!(c.get_u64("console", 1).is_err());
    }

    #[test]
    fn cmdline_quotes_last_wins_and_values_with_equals() {
        let c = Cmdline::parse(
            r#"guest.kmsg_grep="iommu group|DMAR" a=1 a=2 guest.fio=--name=r+--bs=4k"#,
        );
        assert_eq!(c.get("guest.kmsg_grep"), Some("iommu group|DMAR"));
        assert_eq!(c.get("a"), Some("2"));
        assert_eq!(c.get("guest.fio"), Some("--name=r+--bs=4k"));
        assert!(Cmdline::parse("").checks().is_empty());
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0\n"), Ok(1));
        assert_eq!(parse_cpu_list("0-1"), Ok(2));
        assert_eq!(parse_cpu_list("0-1,3"), Ok(3));
        assert_eq!(parse_cpu_list("0,2-5,7"), Ok(6));
        assert_eq!(parse_cpu_list(""), Ok(0));
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("x").is_err());
    }

    const INTERRUPTS: &str = "           CPU0       CPU1       
  0:         45          0   IO-APIC   2-edge      timer
  4:        120         33   IO-APIC   4-edge      ttyS0
 24:          0          7  PCI-MSIX-0000:00:02.0   0-edge      virtio1-config
NMI:          0          0   Non-maskable interrupts
LOC:       1234       5678   Local timer interrupts
ERR:          0
";

    #[test]
    fn interrupts_lines() {
        let mut lines = INTERRUPTS.lines();
        assert_eq!(interrupts_cpu_columns(lines.next().unwrap()), 2);
        let l = parse_interrupts_line(
            "  4:        120         33   IO-APIC   4-edge      ttyS0",
            2,
        )
        .unwrap();
        assert_eq!(l.irq, "4");
        assert_eq!(l.counts, vec![120, 33]);
        assert_eq!(l.total(), 153);
        assert_eq!(l.desc, "IO-APIC   4-edge      ttyS0");
        let e = parse_interrupts_line("ERR:          0", 2).unwrap();
        assert_eq!((e.irq, e.counts.clone(), e.desc), ("ERR", vec![0], ""));
        let n = parse_interrupts_line("NMI:  1  2   Non-maskable interrupts", 2).unwrap();
        assert_eq!(n.desc, "Non-maskable interrupts");
        assert_eq!(parse_interrupts_line("           CPU0       CPU1", 2), None);
    }

    #[test]
    fn serial_irq_found() {
        let l = find_serial_irq(INTERRUPTS).unwrap();
        assert_eq!(l.irq, "4");
        assert_eq!(l.total(), 153);
        let none = "   CPU0\n  0:  1  IO-APIC 2-edge timer\n";
        assert_eq!(find_serial_irq(none), None);
        let named = "   CPU0\n  4:  9  IO-APIC 4-edge serial\n";
        assert_eq!(find_serial_irq(named).unwrap().total(), 9);
    }

    #[test]
    fn kmsg_records() {
        assert_eq!(
            kmsg_text(
                "6,339,5140900,-;virtio_blk virtio1: [vda] 524288 512-byte\n SUBSYSTEM=virtio\n"
            ),
            Some("virtio_blk virtio1: [vda] 524288 512-byte")
        );
        assert_eq!(kmsg_text("6,1,2,-,caller=T1;hello"), Some("hello"));
        assert_eq!(kmsg_text("garbage"), None);
        assert!(kmsg_matches("DMAR-IR: Enabled IRQ remapping", "iommu|dmar"));
        assert!(!kmsg_matches("Run /init as init process", "iommu|dmar"));
        assert!(kmsg_matches("anything", ""));
    }

    #[test]
    fn fio_parsing() {
        assert_eq!(
            fio_args("--name=r+--filename=/dev/vda++--rw=randread"),
            vec!["--name=r", "--filename=/dev/vda", "--rw=randread"]
        );
        let mut fields = vec!["0"; 130];
        fields[0] = "3";
        fields[1] = "fio-3.33";
        fields[2] = "r";
        fields[7] = "5";
        fields[48] = "7";
        let line = fields.join(";");
        assert_eq!(fio_terse_iops(&line), Some(("r", 5, 7)));
        fields[0] = "5";
        fields[48] = "0";
        fields[54] = "9";
        assert_eq!(fio_terse_iops(&fields.join(";")), Some(("r", 5, 9)));
        assert_eq!(fio_terse_iops("fio: some error"), None);
    }

    #[test]
    fn one_line_values() {
        assert_eq!(one_line("a\nb\r\n"), "a b");
    }
}
