//! `cordon-probe <probe|row|all> [options]`: prints one JSON report per probe, one per line.
//! Exit status 0 whenever the probes ran (the verdict is in the JSON), 2 on a usage error.

fn main() {
    let invocation = match cordon_probe::parse_args(std::env::args().skip(1)) {
        Ok(invocation) => invocation,
        Err(error) => {
            eprintln!("cordon-probe: {error}\n{}", cordon_probe::USAGE);
            std::process::exit(2);
        }
    };
    for name in invocation.probes {
        let probe = cordon_probe::find_probe(name).expect("parse_args returns known probes");
        let report = probe.report(&invocation.options);
        println!(
            "{}",
            serde_json::to_string(&report).expect("a report always serializes")
        );
    }
}
