//! Replays every committed corpus file (`corpus/TARGET/*`) and every regression input
//! (`regressions/TARGET/*`) through its target, without libFuzzer: what CI runs. A panic
//! here is a crash the fuzzer would report.

use std::path::Path;

#[test]
fn every_corpus_file_runs_through_its_target_without_a_crash() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, run) in vmm_fuzz::TARGETS {
        let mut n = 0;
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                continue;
            };
            for e in entries {
                let path = e.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                run(&data);
                n += 1;
            }
        }
        eprintln!("{name}: {n} inputs replayed");
        assert!(n > 0, "no corpus for target {name}");
    }
}

#[test]
fn empty_and_tiny_inputs_are_fine() {
    for (_, run) in vmm_fuzz::TARGETS {
        run(&[]);
        for b in 0..=255u8 {
            run(&[b]);
            run(&[b; 64]);
        }
    }
}
