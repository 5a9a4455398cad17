//! `waymark state`: inspect, compact, expire, move or drop the RocksDB state.
//! Every subcommand finds the directory the same way: `--state-dir`, else
//! `state.dir` of the configuration (`--config`, `WAYMARK_STATE_DIR`).

use std::io::{BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;

use waymark::config::{Config, Overrides};
use waymark::routing::Placement;
use waymark::state::Keyspace;
use waymark::store::{system_clock, RocksStore};

use super::args::{ConfigArgs, KafkaArgs};
use super::{load_config, open_existing, open_existing_read_only, validate_kafka, Failure};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Keys and disk use per keyspace.
    Stats {
        #[command(flatten)]
        dir: StateDirArgs,
    },
    /// Compact every keyspace now (drops expired entries).
    Compact {
        #[command(flatten)]
        dir: StateDirArgs,
    },
    /// Delete every entry whose TTL has passed, now, and say how many.
    Expire {
        #[command(flatten)]
        dir: StateDirArgs,
    },
    /// Write state as NDJSON ({"keyspace","key","value"} in hex), all or one partition.
    Export {
        #[command(flatten)]
        dir: StateDirArgs,
        #[command(flatten)]
        partition: PartitionArgs,
        /// Output file (- for stdout).
        #[arg(long, default_value = "-")]
        output: String,
    },
    /// Load NDJSON written by `state export` (into a new or existing state directory).
    Import {
        #[command(flatten)]
        dir: StateDirArgs,
        /// Input file (- for stdin).
        #[arg(long, default_value = "-")]
        input: String,
    },
    /// Delete all state of one partition (dedupe keys, shipments, progress), here
    /// and, with state.changelog on, in its changelog (a drop marker that every
    /// later restore honours). Stop the group's worker that owns it first.
    Drop {
        #[command(flatten)]
        dir: StateDirArgs,
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        partition: PartitionArgs,
        /// Drop only this directory's copy; the changelog restores it at the next
        /// assignment (for when the broker is out of reach).
        #[arg(long)]
        local_only: bool,
    },
}

/// Which state directory: `--state-dir`, else the configuration's `state.dir`.
#[derive(clap::Args)]
pub struct StateDirArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// State directory (default: state.dir of the configuration, WAYMARK_STATE_DIR).
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

impl StateDirArgs {
    fn resolve(self) -> Result<(Config, PathBuf), Failure> {
        self.resolve_with(Overrides::default())
    }

    fn resolve_with(self, overrides: Overrides) -> Result<(Config, PathBuf), Failure> {
        let config = load_config(&self.config, Overrides { state_dir: self.state_dir, ..overrides })?;
        let dir = config.state_dir.clone();
        Ok((config, dir))
    }
}

/// One partition that owns state, by topic and number: a home partition of the
/// repartition topic (`<group_id>-repartition`, the default routing), or an input
/// partition with `routing.mode = "input"`.
#[derive(clap::Args)]
pub struct PartitionArgs {
    /// Topic of the partition (with --partition), e.g. waymark-repartition.
    #[arg(long, requires = "partition")]
    topic: Option<String>,
    /// Partition number (with --topic).
    #[arg(long, requires = "topic")]
    partition: Option<i32>,
}

impl PartitionArgs {
    fn scope(&self) -> Option<waymark::state::Scope> {
        match (&self.topic, self.partition) {
            (Some(topic), Some(partition)) => Some(waymark::state::Scope::of(topic, partition)),
            _ => None,
        }
    }
}

/// A partition that can own state in this configuration: a home partition of
/// the repartition topic, or (`routing.mode = "input"`) an input partition.
/// Anything else holds nothing, and a drop of it would report a success that
/// changed nothing.
fn owns_state(config: &Config, topic: &str, number: i32) -> Result<(), Failure> {
    let owned = match &config.placement {
        Placement::Home { topic: home, partitions } => topic == home && (0..*partitions as i64).contains(&(number as i64)),
        Placement::Input => config.kafka.input_topics.iter().any(|t| t == topic) && number >= 0,
    };
    if owned {
        return Ok(());
    }
    let which = match &config.placement {
        Placement::Home { topic: home, partitions } => format!("with routing.mode = \"home\", state lives in the partitions 0 to {} of {home}", partitions.saturating_sub(1)),
        Placement::Input => format!("with routing.mode = \"input\", state lives in the input topics' partitions ({})", config.kafka.input_topics.join(", ")),
    };
    Err(Failure::usage(anyhow::anyhow!(
        "{topic} partition {number} owns no state in this configuration ({which}); nothing was dropped. Check --topic, --partition and kafka.group_id"
    )))
}

pub fn exec(command: Command) -> Result<(), Failure> {
    match command {
        Command::Stats { dir } => {
            let (_, state_dir) = dir.resolve()?;
            // Read-only: works beside a running worker.
            let store = open_existing_read_only(&state_dir)?;
            let mut out = std::io::stdout().lock();
            let layout = store.layout().map_err(anyhow::Error::new)?;
            let _ = writeln!(out, "layout: {}", layout.as_deref().unwrap_or("(none: empty, or written by a Waymark older than shipment homes)"));
            let _ = writeln!(out, "{:<10} {:>14} {:>14}", "keyspace", "keys (est.)", "sst bytes");
            for keyspace in Keyspace::ALL {
                let keys = store.estimated_keys(keyspace).map_err(anyhow::Error::new)?;
                let bytes = store.disk_bytes(keyspace).map_err(anyhow::Error::new)?;
                let _ = writeln!(out, "{:<10} {:>14} {:>14}", keyspace.name(), keys, bytes);
            }
            Ok(())
        }
        Command::Compact { dir } => {
            let (_, state_dir) = dir.resolve()?;
            let store = open_existing(&state_dir)?;
            if std::io::stderr().is_terminal() {
                eprintln!("compacting {} ...", state_dir.display());
            }
            store.flush().map_err(anyhow::Error::new)?;
            store.compact().map_err(anyhow::Error::new)?;
            eprintln!("compacted {}", state_dir.display());
            Ok(())
        }
        Command::Expire { dir } => {
            let (_, state_dir) = dir.resolve()?;
            let store = open_existing(&state_dir)?;
            for (keyspace, n) in store.expire(Utc::now().timestamp_millis()).map_err(anyhow::Error::new)? {
                println!("{:<10} {n} expired entries deleted", keyspace.name());
            }
            Ok(())
        }
        Command::Export { dir, partition, output } => {
            let (_, state_dir) = dir.resolve()?;
            let store = open_existing_read_only(&state_dir)?;
            let asked = partition.scope().is_some();
            let mut out: Box<dyn Write> = if output == "-" {
                Box::new(BufWriter::new(std::io::stdout().lock()))
            } else {
                Box::new(BufWriter::new(std::fs::File::create(&output).with_context(|| format!("cannot create {output}"))?))
            };
            let n = store.export(partition.scope(), &mut out).map_err(anyhow::Error::new)?;
            out.flush().context("cannot write the export")?;
            eprintln!("exported {n} entries");
            if asked && n == 0 {
                eprintln!("note: no state for that partition: check --topic (a home partition's topic is <group_id>-repartition) and --partition");
            }
            Ok(())
        }
        Command::Import { dir, input } => {
            let (_, state_dir) = dir.resolve()?;
            // The input first: a missing file must not leave an empty state directory behind.
            let mut reader: Box<dyn std::io::BufRead> = if input == "-" {
                Box::new(std::io::BufReader::new(std::io::stdin().lock()))
            } else {
                let file = std::fs::File::open(&input)
                    .map_err(|e| Failure { code: 2, error: anyhow::anyhow!("cannot open the import file {input}: {e}") })?;
                Box::new(std::io::BufReader::new(file))
            };
            let created = !state_dir.exists();
            let store = RocksStore::open(&state_dir, &Default::default(), system_clock()).map_err(anyhow::Error::new)?;
            let imported = store.import(&mut reader);
            if imported.is_err() && created {
                // Nothing worth keeping: a failed import into a new directory
                // must not leave an empty state directory behind.
                drop(store);
                let _ = std::fs::remove_dir_all(&state_dir);
            }
            let n = imported.map_err(|e| match e {
                // The file is wrong, not the store: say so, and never suggest deleting state.
                waymark::error::StoreError::Corrupt { keyspace: "import", reason } => Failure {
                    code: 2,
                    error: anyhow::anyhow!("{input} is not a `waymark state export` file: {reason} (nothing after that line was imported)"),
                },
                other => anyhow::Error::new(other).into(),
            })?;
            eprintln!("imported {n} entries into {}", state_dir.display());
            Ok(())
        }
        Command::Drop { dir, kafka, partition, local_only } => {
            let (Some(scope), Some(topic), Some(number)) = (partition.scope(), partition.topic.as_deref(), partition.partition) else {
                return Err(Failure::usage(anyhow::anyhow!("state drop needs --topic and --partition")));
            };
            let (config, state_dir) = dir.resolve_with(kafka.overrides())?;
            owns_state(&config, topic, number)?;
            // The directory's lock first: a worker that still runs on it would
            // write the partition's state straight back.
            let store = open_existing(&state_dir)?;
            if config.changelog.is_some() && !local_only {
                validate_kafka(&config)?;
            }
            let changelog = waymark::worker::changelog::topic_for(&config.kafka.group_id, topic);
            if config.changelog.is_none() {
                // No changelog: the local copy is the only one.
            } else if local_only {
                eprintln!(
                    "note: --local-only: the worker restores this partition from {changelog} at the next assignment; run `waymark state drop` without it while the broker is reachable to forget it for good"
                );
            } else {
                // A running group would not see the marker: the partition's
                // owner reads its changelog on from its own writes, so it keeps
                // the state while a later restore elsewhere drops it (instances
                // that disagree: duplicates and statuses moving back). Only a
                // stopped group can be dropped from.
                let members = waymark::worker::topics::group_members(&waymark::worker::base_config(&config), &config.kafka.group_id, Duration::from_secs(15))
                    .map_err(|e| Failure {
                        code: 1,
                        error: anyhow::anyhow!(
                            "cannot tell whether group `{}` is running ({e}); nothing was dropped. Check kafka.brokers (--config, WAYMARK_BROKERS or --brokers), or pass --local-only to drop only this directory's copy",
                            config.kafka.group_id
                        ),
                    })?;
                if !members.is_empty() {
                    return Err(Failure {
                        code: 2,
                        error: anyhow::anyhow!(
                            "group `{}` has {} active member(s) ({}): stop every instance of the group first. Dropped while it runs, the marker lands among the partition owner's own changelog writes, which it never reads back: it keeps the state while later restores elsewhere drop it. Nothing was dropped",
                            config.kafka.group_id,
                            members.len(),
                            members.join(", ")
                        ),
                    });
                }
                // Marker before the local drop: if the drop then fails, the next
                // restore reads the marker and drops the local copy anyway.
                let client = waymark::worker::client::producer_config(&config);
                match waymark::worker::changelog::write_drop_marker(&client, &config.kafka.group_id, topic, number, Utc::now(), Duration::from_secs(15)) {
                    Ok(true) => eprintln!("wrote a drop marker to {changelog} [{number}]: restores from the changelog forget what came before it"),
                    Ok(false) => eprintln!("no changelog topic {changelog} on {}: nothing can restore this partition", config.kafka.brokers),
                    Err(e) => {
                        return Err(Failure {
                            code: 1,
                            error: anyhow::anyhow!(
                                "{e}; nothing was dropped. Check kafka.brokers and kafka.group_id (--config, WAYMARK_BROKERS, WAYMARK_GROUP_ID, --brokers), or pass --local-only to drop only this directory's copy"
                            ),
                        })
                    }
                }
            }
            store.drop_scope(scope).map_err(anyhow::Error::new)?;
            eprintln!("dropped the state of {topic} partition {number} in {}", state_dir.display());
            Ok(())
        }
    }
}
