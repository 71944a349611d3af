//! Command-line interface: argument definitions and one module per subcommand.

mod adapt_cmd;
mod bench_cmd;
mod check_device_cmd;
mod data_cmd;
mod export_cmd;
mod graph_cmd;
mod inspect_cmd;
mod load;
mod report_cmd;
mod run_cmd;

use clap::{Parser, Subcommand};

/// What a command concluded, beyond "it ran".
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// A comparison or verification found a difference (exit code 1).
    CheckFailed,
}

/// mtpack: one pretrained ONNX backbone in, one multi-task ONNX model out.
///
/// Data goes to stdout (`--json` for machine-readable output); progress and logs go to
/// stderr. Exit codes: 0 success, 1 a check failed, 2 error.
#[derive(Parser, Debug)]
#[command(name = "mtpack", version, about, long_about)]
pub struct Cli {
    /// Silence progress output on stderr.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train tasks onto a backbone with one method, into a resumable pack directory.
    Adapt(Box<adapt_cmd::Args>),
    /// Write one verified multi-task ONNX artifact from a pack.
    Export(export_cmd::ExportArgs),
    /// Check an exported artifact: digests, manifest, probes in tract and ONNX Runtime.
    Verify(export_cmd::VerifyArgs),
    /// Learn one scenario with every method and print the measured comparison table.
    Bench(bench_cmd::Args),
    /// Render a pack's results, or a bench run's comparison of methods, as a static HTML page
    /// with its figure beside it as SVG and PNG (text included).
    Report(report_cmd::Args),
    /// Describe a model: inputs, outputs, ops, parameters, trainable layers, head and feature tensor.
    Inspect(inspect_cmd::Args),
    /// Run a model on inputs from a safetensors file in ONNX Runtime, tract, or both.
    Run(run_cmd::Args),
    /// Check that training on a GPU (or with the portable ops) computes what the CPU computes.
    CheckDevice(Box<check_device_cmd::Args>),
    /// Import and examine task datasets.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Graph surgery: cut, drop or add heads, merge.
    #[command(subcommand)]
    Graph(graph_cmd::GraphCommand),
}

/// The `--wait` flag of the commands that lock a pack.
fn wait(flag: bool) -> crate::pack::lock::Wait {
    if flag {
        crate::pack::lock::Wait::Yes
    } else {
        crate::pack::lock::Wait::No
    }
}

pub fn main() -> anyhow::Result<Outcome> {
    let cli = Cli::parse();
    match cli.command {
        Command::Adapt(a) => adapt_cmd::run(*a, cli.quiet),
        Command::Export(a) => export_cmd::run_export(a, cli.quiet),
        Command::Verify(a) => export_cmd::run_verify(a),
        Command::Bench(a) => bench_cmd::run(a, cli.quiet),
        Command::Report(a) => report_cmd::run(a, cli.quiet),
        Command::Inspect(a) => inspect_cmd::run(a),
        Command::Run(a) => run_cmd::run(a),
        Command::CheckDevice(a) => check_device_cmd::run(*a, cli.quiet),
        Command::Data(c) => data_cmd::run(c, cli.quiet),
        Command::Graph(c) => graph_cmd::run(c),
    }
}

/// Prints a value as pretty JSON on stdout.
pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap checks a command's definition (unique ids and groups, e.g. of the flattened
    /// method parameters) only when it is built; this builds every subcommand.
    #[test]
    fn the_command_line_is_well_formed() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }
}
