//! `vmm`: boots a Linux guest on KVM with a paravirtual IOMMU it sees early in boot.

use std::process::ExitCode;

use clap::Parser;

use vmm::config::{Cli, VmConfig};
use vmm::{stats, vm};

/// Prints an error and its sources on one line: `vmm: error: A: B: C`.
fn print_error_chain(err: &dyn std::error::Error) {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        // Some libraries (linux-loader) repeat their source's text in their own message.
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    eprintln!("vmm: error: {msg}");
}

fn init_logger(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let logger = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .build();
    let max = logger.filter();
    // Dependencies that log guest-caused conditions (virtio-queue: an error per malformed
    // chain) are re-levelled to debug and share the guest-message rate limit.
    let filtered = devices::ratelimit::GuestLogFilter::new(logger, max);
    if log::set_boxed_logger(Box::new(filtered)).is_ok() {
        log::set_max_level(max);
    }
}

fn main() -> ExitCode {
    vmm::fatal::install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // clap's message spans several lines (details, usage, hint): keep what comes
            // before the usage, joined into one line.
            let text = e.to_string();
            let msg: Vec<_> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(|l| l.trim().trim_start_matches("error: "))
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("vmm: error: {}", msg.join(" "));
            return ExitCode::from(2);
        }
    };
    init_logger(cli.verbose);
    let cfg = match VmConfig::from_cli(cli) {
        Ok(c) => c,
        Err(e) => {
            print_error_chain(&e);
            return ExitCode::from(2);
        }
    };
    match vm::run(&cfg) {
        Ok(outcome) => {
            let code = outcome.exit.exit_code();
            if code == 0 {
                log::info!("{}", outcome.exit.describe());
            } else {
                eprintln!("vmm: {}", outcome.exit.describe());
            }
            if let Err(e) = stats::report(&cfg, &outcome) {
                print_error_chain(&e);
                return ExitCode::from(1);
            }
            ExitCode::from(code.clamp(0, 255) as u8)
        }
        Err(e) => {
            print_error_chain(&e);
            ExitCode::from(1)
        }
    }
}
