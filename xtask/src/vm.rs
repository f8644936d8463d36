//! `cargo xtask vm-test`: the privileged tests inside Debian's stock kernels.
//!
//! The kernel comes from `scripts/vm-kernel.sh` (apt download + unpack, never installed as
//! the host's kernel). The test binaries are built on the host; the guest runs over the
//! host's root filesystem (virtme-ng, `--disable-kvm`: this machine kind has no usable KVM),
//! so it sees the same binaries and tools. The host lists the tests (libtest's `--list`); the
//! guest runs each as its own process and writes its output and exit code into a directory
//! shared read-write with the host; the host streams that output while the VM runs, stops a
//! VM that goes silent (see `STALL`), and fails when any test failed or never reported.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{cargo, root};

/// The longest a whole VM run may take before it is stopped as hung.
const VM_TIMEOUT: Duration = Duration::from_mins(55);

/// Build the test binaries and return (name, executable) for `wanted`: each a binary's name,
/// or `NAME:FILTER` for only its tests matching FILTER, or `all`. Release builds:
/// under software emulation the daemon's debug build is several times slower.
fn test_binaries(wanted: &[String]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    crate::run(cargo().args(["build", "--release", "--bins"]))?;
    let out = cargo()
        .current_dir(root())
        .args([
            "test",
            "--release",
            "--no-run",
            "--message-format=json",
            "-p",
            "switchyard-tests",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test binaries failed");
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str())
        else {
            continue;
        };
        for w in wanted {
            if w == "all" {
                found.push((name.to_string(), PathBuf::from(exe)));
            } else if w.split(':').next() == Some(name) {
                found.push((w.clone(), PathBuf::from(exe)));
            }
        }
    }
    for w in wanted.iter().filter(|w| *w != "all") {
        if !found.iter().any(|(n, _)| n == w) {
            bail!("no test binary named {w} in switchyard-tests");
        }
    }
    found.sort();
    Ok(found)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// One test to run in the guest: the binary's name (as given), its executable, the test's
/// full name.
struct Case {
    binary: String,
    exe: PathBuf,
    test: String,
}

/// Every test the binaries would run with `args` (libtest's own `--list`, run on the host:
/// the guest sees the same files).
fn list_cases(binaries: &[(String, PathBuf)], args: &[String]) -> anyhow::Result<Vec<Case>> {
    let mut cases = Vec::new();
    for (name, exe) in binaries {
        let mut cmd = Command::new(exe);
        cmd.args(["--list", "--format", "terse"]);
        // Filters and --skip narrow the list; output options do not matter to it.
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "--skip" {
                if let Some(v) = it.next() {
                    cmd.args(["--skip", v]);
                }
            } else if a == "--exact" || a == "--ignored" || a == "--include-ignored" {
                cmd.arg(a);
            }
        }
        if let Some((_, filter)) = name.split_once(':') {
            cmd.arg(filter);
        }
        let out = cmd
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("listing the tests of {}", exe.display()))?;
        if !out.status.success() {
            bail!("{} --list failed", exe.display());
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(test) = line.strip_suffix(": test") {
                cases.push(Case {
                    binary: name.clone(),
                    exe: exe.clone(),
                    test: test.to_string(),
                });
            }
        }
    }
    Ok(cases)
}

/// How one boot of the VM ended.
enum Boot {
    /// The guest ran every case it was given and powered off.
    Finished,
    /// No output for `STALL`: the VM was stopped; the cases from the first one without an
    /// exit code on are still to run.
    Stalled,
}

/// The longest a single test may run in the guest without writing a line before the VM is
/// stopped as hung (the slowest scenario takes about 4 min under emulation).
const STALL: Duration = Duration::from_mins(10);

/// One kernel: fetch it, boot it, run the tests one by one, report.
///
/// Each test runs as its own process with its exit code in its own file. When the guest
/// goes silent for `STALL` (a test or the emulated kernel hung: seen once in ~20 CI runs,
/// QEMU spinning one core), the VM is stopped, the hang is reported by name, and a new VM
/// runs the rest, that test first, once more; a test that hangs twice fails the run.
fn run_kernel(kernel: &str, binaries: &[(String, PathBuf)], args: &[String]) -> anyhow::Result<()> {
    let script = root().join("scripts/vm-kernel.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(kernel)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("cannot get the {kernel} kernel (see the vm-kernel messages above)");
    }
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = printed.lines();
    let (Some(vmlinuz), Some(vng)) = (lines.next(), lines.next()) else {
        bail!("{} printed no kernel and vng paths", script.display());
    };
    let cases = list_cases(binaries, args)?;
    if cases.is_empty() {
        bail!(
            "no test matched in {:?}",
            binaries.iter().map(|b| &b.0).collect::<Vec<_>>()
        );
    }
    let work = root().join("target/vm").join(format!("run-{kernel}"));
    let _ = std::fs::remove_dir_all(&work);
    let shared = work.join("out");
    std::fs::create_dir_all(&shared)?;
    // Output options (--nocapture, ...) pass through; the selection is per case.
    let mut passthrough = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--skip" {
            it.next();
        } else if !a.starts_with("--") || a == "--exact" {
            // a filter: already applied by the listing
        } else {
            passthrough.push(shell_quote(a));
        }
    }
    let started = Instant::now();
    let mut next = 0usize;
    let mut hung: Vec<usize> = Vec::new();
    let mut boots = 0;
    while next < cases.len() {
        boots += 1;
        match boot(
            kernel,
            vmlinuz,
            vng,
            &work,
            &shared,
            &cases,
            next,
            &passthrough,
            started,
            boots,
        )? {
            Boot::Finished => break,
            Boot::Stalled => {
                let first = (next..cases.len())
                    .find(|i| !shared.join(format!("rc-{i}")).exists())
                    .unwrap_or(cases.len());
                if first == cases.len() {
                    break;
                }
                let c = &cases[first];
                eprintln!(
                    "xtask: {kernel} VM: {} {} wrote nothing for {} min: VM stopped{}",
                    c.binary,
                    c.test,
                    STALL.as_secs() / 60,
                    if hung.contains(&first) {
                        "; it hung twice, failing it"
                    } else {
                        "; a new VM runs it again, then the rest"
                    }
                );
                if hung.contains(&first) {
                    std::fs::write(shared.join(format!("rc-{first}")), "hung twice\n")?;
                    next = first + 1;
                } else {
                    hung.push(first);
                    next = first;
                }
            }
        }
    }
    let took = started.elapsed();
    let mut failed = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        match std::fs::read_to_string(shared.join(format!("rc-{i}"))) {
            Ok(rc) if rc.trim() == "0" => {}
            Ok(rc) => failed.push(format!("{} {} ({})", c.binary, c.test, rc.trim())),
            Err(_) => failed.push(format!(
                "{} {} never reported (VM crashed or stopped)",
                c.binary, c.test
            )),
        }
    }
    let retried: Vec<String> = hung
        .iter()
        .map(|&i| format!("{} {}", cases[i].binary, cases[i].test))
        .collect();
    eprintln!(
        "xtask: {kernel} VM: {} tests in {:.0} s, {boots} boot(s){}",
        cases.len(),
        took.as_secs_f64(),
        if retried.is_empty() {
            String::new()
        } else {
            format!("; hung once and run again: {}", retried.join(", "))
        }
    );
    if !failed.is_empty() {
        let console = work.join("console.log");
        let tail = tail_lines(&console, 30);
        bail!(
            "on the {kernel} kernel, failed: {}\nlast console lines ({}):\n{tail}",
            failed.join("; "),
            console.display()
        );
    }
    Ok(())
}

/// Boot the VM once and run `cases[from..]`, streaming the guest's log.
#[allow(clippy::too_many_arguments)]
fn boot(
    kernel: &str,
    vmlinuz: &str,
    vng: &str,
    work: &Path,
    shared: &Path,
    cases: &[Case],
    from: usize,
    passthrough: &[String],
    started: Instant,
    n: usize,
) -> anyhow::Result<Boot> {
    let log = shared.join(format!("log-{n}"));
    std::fs::write(&log, "")?;
    let log_q = shell_quote(&log.to_string_lossy());
    let mut guest = String::from("#!/bin/sh\n");
    guest.push_str(&format!("cd {}\n", shell_quote(&root().to_string_lossy())));
    guest.push_str("export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n");
    guest.push_str(&format!("export SY_VM_KERNEL={}\n", shell_quote(kernel)));
    guest.push_str("export RUST_BACKTRACE=1\n");
    guest.push_str(&format!(
        "echo \"== guest kernel $(uname -r)\" >> {log_q}\n"
    ));
    for (i, c) in cases.iter().enumerate().skip(from) {
        let rc = shell_quote(&shared.join(format!("rc-{i}")).to_string_lossy());
        guest.push_str(&format!(
            "echo \"== {} {}\" >> {log_q}\n{} --test-threads=1 --exact {} {} >> {log_q} 2>&1\necho $? > {rc}\n",
            c.binary,
            c.test,
            shell_quote(&c.exe.to_string_lossy()),
            shell_quote(&c.test),
            passthrough.join(" "),
        ));
    }
    let guest_path = work.join(format!("guest-{n}.sh"));
    std::fs::write(&guest_path, guest)?;
    std::fs::set_permissions(
        &guest_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;

    eprintln!("xtask: booting {vmlinuz} (software emulation; ~10 s to boot)");
    let console = std::fs::File::create(work.join(format!("console-{n}.log")))?;
    let _ = std::fs::remove_file(work.join("console.log"));
    let _ = std::os::unix::fs::symlink(format!("console-{n}.log"), work.join("console.log"));
    let mut vm = Command::new(vng)
        .args(["--disable-kvm", "--memory", "4G", "--cpus", "2", "-v", "-r"])
        .arg(vmlinuz)
        .arg("--rwdir")
        .arg(shared)
        .arg("--exec")
        .arg(&guest_path)
        .current_dir(root())
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        .process_group(0)
        .spawn()
        .context("spawning vng (virtme-ng)")?;
    // vng runs QEMU as a child: stopping the VM means the whole process group.
    let stop = |vm: &mut std::process::Child| {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", vm.id())])
            .status();
        let _ = vm.wait();
    };
    let mut reader = std::fs::File::open(&log)?;
    let mut pos = 0u64;
    let mut last_output = Instant::now();
    let mut pump = |reader: &mut std::fs::File, last: &mut Instant| -> anyhow::Result<()> {
        reader.seek(SeekFrom::Start(pos))?;
        let mut buf = String::new();
        let n = reader.read_to_string(&mut buf)?;
        if n > 0 {
            *last = Instant::now();
        }
        pos += n as u64;
        eprint!("{buf}");
        Ok(())
    };
    loop {
        if vm.try_wait()?.is_some() {
            pump(&mut reader, &mut last_output)?;
            return Ok(Boot::Finished);
        }
        if started.elapsed() > VM_TIMEOUT {
            stop(&mut vm);
            pump(&mut reader, &mut last_output)?;
            bail!(
                "{kernel} VM still running after {} min: stopped (console: {})",
                VM_TIMEOUT.as_secs() / 60,
                work.join("console.log").display()
            );
        }
        if last_output.elapsed() > STALL {
            stop(&mut vm);
            pump(&mut reader, &mut last_output)?;
            return Ok(Boot::Stalled);
        }
        pump(&mut reader, &mut last_output)?;
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn tail_lines(p: &Path, n: usize) -> String {
    let Ok(f) = std::fs::File::open(p) else {
        return String::new();
    };
    let lines: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn run(kernel: &str, tests: &[String], args: &[String]) -> anyhow::Result<()> {
    let kernels: Vec<&str> = match kernel {
        "all" => vec!["6.1", "6.12"],
        "6.1" | "6.12" => vec![kernel],
        other => bail!("--kernel {other}: expected 6.1, 6.12 or all"),
    };
    let binaries = test_binaries(tests)?;
    let mut failed = Vec::new();
    for k in kernels {
        if let Err(e) = run_kernel(k, &binaries, args) {
            eprintln!("xtask: {e:#}");
            failed.push(k);
        }
    }
    if !failed.is_empty() {
        bail!("vm-test failed on {}", failed.join(", "));
    }
    Ok(())
}
