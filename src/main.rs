//! The `waymark` binary: parses the command line and hands each command to its
//! file in `src/cli/`. Exit codes: 0 success, 2 usage or configuration error,
//! 1 runtime failure.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's allocator: per event the pipeline allocates and
/// frees many small strings and buffers (docs/benchmarks.md measures it).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `waymark --version`: the crate version, the commit and what the build can do.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("WAYMARK_GIT_COMMIT"),
    "; features: runtime; librdkafka bundled with gzip, snappy, lz4, zstd, ssl; RocksDB bundled with lz4)"
);

#[derive(Parser)]
#[command(name = "waymark", version = VERSION, about = "Carrier-tracking ingestion: raw carrier webhooks in, deduplicated ensure-milestone upserts out")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the Kafka worker (consumer group in, upserts and dead letters out).
    Run(cli::run::Args),
    /// Receive carriers' webhooks over HTTP: verify each provider's signature,
    /// put the body on its raw topic, answer 200 only once the broker has it.
    Ingest(cli::ingest::Args),
    /// Replay kcat -J archives, or a topic's history, through the same pipeline and state.
    Replay(cli::replay::Args),
    /// Put a kcat -J archive (file, .gz, directory, or - for stdin) back on Kafka
    /// with its keys and headers: re-drive dumps, backfills and dead letters.
    Produce(cli::produce::Args),
    /// Normalize one webhook body and print its canonical events as NDJSON.
    Normalize(cli::normalize::Args),
    /// Validate a configuration: the file, environment variables, flags, declared
    /// carrier mappings and every librdkafka property (exit 2 naming what is
    /// wrong); with --connect, also reach the brokers and check the topics.
    Check(cli::check::Args),
    /// Recompute what a raw topic's range should have produced and compare it
    /// with the output topic (exit 1 on any divergence).
    Audit(cli::audit::Args),
    /// Retract a milestone the carrier got wrong (a false delivered scan): one
    /// correction on kafka.control_topic, applied by the worker in order with
    /// the shipment's events; the shipment's status becomes what its remaining
    /// milestones give.
    Correct(cli::correct::Args),
    /// Why a record's events came out as they did (--record, --input), or where a
    /// shipment stands (--shipment), from the state (read-only, beside a running worker).
    Explain(cli::explain::Args),
    /// Probe a running worker's /healthz (exit 0 healthy, 1 not): the container
    /// health check, with nothing but the binary.
    Health(cli::health::Args),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) to stdout: `waymark man > waymark.1`.
    Man,
    /// Inspect, compact, expire, export, import or drop the state store.
    State {
        #[command(subcommand)]
        command: cli::state::Command,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Run(args) => cli::run::exec(args),
        Command::Ingest(args) => cli::ingest::exec(args),
        Command::Replay(args) => cli::replay::exec(args),
        Command::Produce(args) => cli::produce::exec(args),
        Command::Normalize(args) => cli::normalize::exec(args),
        Command::Check(args) => cli::check::exec(args),
        Command::Explain(args) => cli::explain::exec(args),
        Command::Correct(args) => cli::correct::exec(args),
        Command::Audit(args) => cli::audit::exec(args),
        Command::Health(args) => cli::health::exec(args),
        Command::State { command } => cli::state::exec(command),
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a write error, and a
            // reader that stops early (`| head -1`) is not one.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "waymark", &mut script);
            cli::write_stdout(&script)
        }
        Command::Man => {
            let mut page = Vec::new();
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
                .render(&mut page)
                .map_err(|e| cli::Failure::from(anyhow::anyhow!("cannot render the man page: {e}")))
                .and_then(|()| cli::write_stdout(&page))
        }
    };
    cli::exit(result)
}
