//! `cargo xtask …`: bootstrap, build-ebpf, test, vm-test, image, fuzz, soak, demo, bench.

mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Bench {
    /// Desired-state build vs one-endpoint ChangeSet at 10k services.
    Model,
    /// Map programming vs raw map updates; connection rate vs direct (root).
    Ebpf,
    /// dnsperf QPS/latency vs Knot serving the same records, and the forwarding cache (root).
    Dns,
    /// iptables full sync and one-service update at 1k/5k/10k services, both flavors (root).
    Iptables,
    /// 1k/10k/100k services: cold start, one change, memory after churn, DNS, conn/s, each
    /// beside its peer (root; `-- --quick` for 1k only, `-- --sizes=N,N --churn-secs=S`).
    Scale,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install what the build and tests need (apt packages, nightly rust-src, bpf-linker).
    Bootstrap,
    /// Build the kernel programs into target/bpfel-unknown-none/release/switchyard.
    BuildEbpf,
    /// The project's test command: bootstrap, fmt, clippy, every test (root tests too) on
    /// this kernel, then the backend scenario suite on Debian's 6.1 kernel in a VM.
    Test {
        /// Skip the 6.1 VM run (quicker local iterations; CI runs it).
        #[arg(long)]
        no_vm: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run privileged test binaries inside Debian's stock kernels (6.1 LTS, 6.12) in a VM
    /// (virtme-ng over the host's root filesystem, software emulation).
    VmTest {
        /// Which kernel: 6.1, 6.12 or all.
        #[arg(long, default_value = "6.1")]
        kernel: String,
        /// Test binaries (integration test names of `tests/`) to run, each `NAME` or
        /// `NAME:FILTER` (only its tests matching FILTER); default: the backend scenario suite.
        #[arg(long = "test", default_value = "backends_e2e")]
        tests: Vec<String>,
        /// Arguments for each test binary (a name filter, `--skip X`, ...).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build the container image localhost/switchyard:VERSION without a Docker engine: a
    /// debootstrap'd Debian bookworm base imported into podman, plus the release binary.
    Image,
    /// Run the fuzz targets (fuzz/, cargo fuzz + libFuzzer) over their committed corpus and
    /// regressions, each for a bounded time.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// libFuzzer's seed (default: random).
        #[arg(long)]
        seed: Option<u64>,
        /// Targets (default: all).
        targets: Vec<String>,
    },
    /// Restarts and upgrades under load (root): SIGTERM, SIGKILL and an upgrade from the
    /// debug build to the release build, with short connections, long streams, an affinity
    /// service and DNS lookups on every path, both backends; one table of failures. Then
    /// kernel state damaged by hand (map entries, programs, pins, chains, the DNS address)
    /// and the time to repair, at syncPeriod 30 s and 2 s.
    Soak {
        /// Milliseconds of load around each event.
        #[arg(long, default_value_t = 10_000)]
        load_ms: u64,
        /// Rounds of the three events (upgrades alternate debug -> release -> debug).
        #[arg(long, default_value_t = 3)]
        rounds: u64,
        /// Backends (default: ebpf and iptables).
        #[arg(long = "backend")]
        backends: Vec<String>,
    },
    /// Sandbox of network namespaces running examples/ on the eBPF backend, with traffic.
    Demo,
    /// Benchmarks, printed as ratios against a peer measured in the same run.
    Bench {
        #[arg(value_enum)]
        which: Bench,
        /// Passed to the benchmark (`scale`: `--quick`, `--sizes=N,N`, `--churn-secs=S`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

pub(crate) fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn bootstrap() -> anyhow::Result<()> {
    run(Command::new("bash").arg(root().join("scripts/bootstrap.sh")))
}

/// `scripts/image.sh` over a fresh release build.
fn image() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    run(cargo().args(["build", "--release", "-p", "switchyard"]))?;
    run(Command::new("bash")
        .arg(root().join("scripts/image.sh"))
        .args(["target/release/switchyard", env!("CARGO_PKG_VERSION")]))?;
    eprintln!("xtask: image took {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

const FUZZ_TARGETS: [&str; 5] = ["dns_request", "manifest", "selector", "config", "conntrack"];

/// Each target over `fuzz/corpus/T` (seeds) and `fuzz/regressions/T` (inputs that once
/// crashed it), new inputs kept under target/fuzz/, for `seconds` each. A crash fails the run
/// and leaves its input in target/fuzz/artifacts/T/: commit it to fuzz/regressions/T with
/// the fix.
///
/// `dev`: an unoptimized build (with overflow checks), several minutes quicker to build: for
/// CI's brief replay of the corpus, where build time dominates; exploring wants `-O`.
fn fuzz(seconds: u64, seed: Option<u64>, targets: &[String], dev: bool) -> anyhow::Result<()> {
    let profile: &[&str] = if dev {
        &["--dev"]
    } else {
        &["-O", "--debug-assertions"]
    };
    let targets: Vec<String> = if targets.is_empty() {
        FUZZ_TARGETS.iter().map(ToString::to_string).collect()
    } else {
        targets.to_vec()
    };
    let root = root();
    run(Command::new("cargo")
        .current_dir(root.join("fuzz"))
        .args(["+nightly", "fuzz", "build"])
        .args(profile))?;
    let mut failed = Vec::new();
    for t in &targets {
        let work = root.join("target/fuzz/corpus").join(t);
        let artifacts = root.join("target/fuzz/artifacts").join(t);
        let regressions = root.join("fuzz/regressions").join(t);
        for d in [&work, &artifacts, &regressions] {
            std::fs::create_dir_all(d)?;
        }
        let started = std::time::Instant::now();
        let r = run(Command::new("cargo")
            .current_dir(root.join("fuzz"))
            .args(["+nightly", "fuzz", "run"])
            .args(profile)
            .arg(t)
            .arg(&work)
            .arg(root.join("fuzz/corpus").join(t))
            .arg(&regressions)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1")
            .args(seed.map(|s| format!("-seed={s}"))));
        eprintln!(
            "xtask: fuzz {t}: {:.0} s, {}",
            started.elapsed().as_secs_f64(),
            if r.is_ok() { "no crash" } else { "CRASH" }
        );
        if let Err(e) = r {
            failed.push(format!("{t}: {e:#}"));
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets crashed (inputs under target/fuzz/artifacts/):\n{}",
            failed.join("\n")
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Bootstrap => bootstrap(),
        Cmd::BuildEbpf => run(Command::new("cargo")
            .env(
                "RUSTFLAGS",
                "--cfg bpf_target_arch=\"x86_64\" -C debuginfo=2 -C link-arg=--btf",
            )
            .args([
                "+nightly",
                "build",
                "--package",
                "switchyard-ebpf",
                "--bins",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
            ])),
        Cmd::Test { no_vm, args } => {
            bootstrap()?;
            run(cargo().args(["fmt", "--all", "--", "--check"]))?;
            run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
            // tests/tests/image.rs runs the image as the DaemonSet would.
            image()?;
            // Every fuzz target, briefly, over its corpus and regressions (a fixed seed:
            // the same exploration on every CI run; `cargo xtask fuzz` explores afresh).
            let fuzzed = fuzz(15, Some(1), &[], true);
            let started = std::time::Instant::now();
            let host = match (
                run(cargo().args(["test", "--no-fail-fast"]).args(&args)),
                fuzzed,
            ) {
                (Ok(()), Ok(())) => Ok(()),
                (Err(t), Ok(())) => Err(t),
                (Ok(()), Err(f)) => Err(f),
                (Err(t), Err(f)) => Err(anyhow::anyhow!("{t:#}; fuzzing: {f:#}")),
            };
            eprintln!(
                "xtask: host tests took {:.0} s",
                started.elapsed().as_secs_f64()
            );
            if no_vm {
                return host;
            }
            // Both run, whatever the other's result: CI reports every failure at once.
            let vm = vm::run(
                "6.1",
                &[
                    "backends_e2e".to_string(),
                    "kube_proxy_cleanup".to_string(),
                    "soak:ipvs".to_string(),
                ],
                // On 6.1 (no TCX) `tcAttachMode: auto` is netlink: the forced-netlink suite
                // would run the same scenarios a second time. iptables-legacy's scenarios run
                // on the host only: the same userspace as the nft ones, over x_tables code
                // that has not changed between these kernels, and under software emulation
                // they cost a fifth of the CI budget's VM part.
                &[
                    "--skip".to_string(),
                    "ebpf_netlink::".to_string(),
                    "--skip".to_string(),
                    "iptables_legacy::".to_string(),
                ],
            );
            match (host, vm) {
                (Ok(()), Ok(())) => Ok(()),
                (Err(h), Ok(())) => Err(h),
                (Ok(()), Err(v)) => Err(v),
                (Err(h), Err(v)) => bail!("host tests: {h:#}; 6.1 VM: {v:#}"),
            }
        }
        Cmd::VmTest {
            kernel,
            tests,
            args,
        } => {
            bootstrap()?;
            vm::run(&kernel, &tests, &args)
        }
        Cmd::Image => {
            bootstrap()?;
            image()
        }
        Cmd::Fuzz {
            seconds,
            seed,
            targets,
        } => {
            bootstrap()?;
            fuzz(seconds, seed, &targets, false)
        }
        Cmd::Soak {
            load_ms,
            rounds,
            backends,
        } => {
            bootstrap()?;
            // Two builds of the same tree, so the upgrade replaces one binary with another.
            run(cargo().args(["build", "--bins"]))?;
            run(cargo().args(["build", "--release", "--bins"]))?;
            let mut cmd = Command::new(root().join("target/release/sy-soak"));
            cmd.arg("--from")
                .arg(root().join("target/debug/switchyard"))
                .arg("--to")
                .arg(root().join("target/release/switchyard"))
                .args(["--load-ms", &load_ms.to_string()])
                .args(["--rounds", &rounds.to_string()]);
            let mut tamper = Command::new(root().join("target/release/sy-soak"));
            tamper.arg("tamper");
            for b in &backends {
                cmd.args(["--backend", b]);
                tamper.args(["--backend", b]);
            }
            run(&mut cmd)?;
            // Then the kernel state is damaged by hand and the repair timed, with the default
            // syncPeriod and a short one.
            run(&mut tamper)
        }
        Cmd::Demo => {
            bootstrap()?;
            run(cargo().args(["build", "--bins"]))?;
            let demo = root().join("target/debug/sy-demo");
            run(Command::new(demo).arg(root().join("examples")))
        }
        Cmd::Bench { which, args } => match which {
            Bench::Model => {
                run(cargo().args(["bench", "-p", "switchyard-model", "--bench", "model"]))
            }
            Bench::Ebpf => {
                bootstrap()?;
                run(cargo().args(["build", "--release", "--bins"]))?;
                run(Command::new(root().join("target/release/sy-bench")).args(&args))
            }
            Bench::Iptables => {
                bootstrap()?;
                run(cargo().args(["build", "--release", "--bins"]))?;
                run(Command::new(root().join("target/release/sy-bench"))
                    .arg("iptables")
                    .args(&args))
            }
            Bench::Dns => {
                bootstrap()?;
                run(cargo().args(["build", "--release", "--bins"]))?;
                run(Command::new(root().join("target/release/sy-bench"))
                    .arg("dns")
                    .args(&args))
            }
            Bench::Scale => {
                bootstrap()?;
                run(cargo().args(["build", "--release", "--bins"]))?;
                run(Command::new(root().join("target/release/sy-bench"))
                    .arg("scale")
                    .args(args))
            }
        },
    }
}
