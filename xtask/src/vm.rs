//! `cargo xtask vm-test`: the privileged tests inside Debian's stock kernels.
//!
//! The kernel comes from `scripts/vm-kernel.sh` (apt download + unpack, never installed as
//! the host's kernel). The test binaries are built on the host; the guest runs over the
//! host's root filesystem (virtme-ng, `--disable-kvm`: this machine kind has no usable KVM),
//! so it sees the same binaries and tools. The guest writes each binary's output and exit
//! code into a directory shared read-write with the host; the host streams that output while
//! the VM runs and fails when any binary failed, or when the VM ended without reporting.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
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

/// One kernel: fetch it, boot it, run the binaries, report.
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
    let work = root().join("target/vm").join(format!("run-{kernel}"));
    let _ = std::fs::remove_dir_all(&work);
    let shared = work.join("out");
    std::fs::create_dir_all(&shared)?;
    let log = shared.join("log");
    std::fs::write(&log, "")?;
    let mut guest = String::from("#!/bin/sh\n");
    guest.push_str(&format!("cd {}\n", shell_quote(&root().to_string_lossy())));
    guest.push_str("export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n");
    guest.push_str(&format!("export SY_VM_KERNEL={}\n", shell_quote(kernel)));
    guest.push_str("export RUST_BACKTRACE=1\n");
    let log_q = shell_quote(&log.to_string_lossy());
    guest.push_str(&format!(
        "echo \"== guest kernel $(uname -r)\" >> {log_q}\n"
    ));
    let quoted_args: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
    for (name, exe) in binaries {
        let rc = shell_quote(&shared.join(format!("rc-{name}")).to_string_lossy());
        let filter = name.split_once(':').map(|(_, f)| shell_quote(f));
        guest.push_str(&format!(
            "echo \"== {name}\" >> {log_q}\n{} --test-threads=1 {} {} >> {log_q} 2>&1\necho $? > {rc}\n",
            shell_quote(&exe.to_string_lossy()),
            quoted_args.join(" "),
            filter.unwrap_or_default()
        ));
    }
    let guest_path = work.join("guest.sh");
    std::fs::write(&guest_path, guest)?;
    std::fs::set_permissions(
        &guest_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;

    eprintln!("xtask: booting {vmlinuz} (software emulation; ~10 s to boot)");
    let started = Instant::now();
    let console = std::fs::File::create(work.join("console.log"))?;
    let mut vm = Command::new(vng)
        .args(["--disable-kvm", "--memory", "4G", "--cpus", "2", "-v", "-r"])
        .arg(vmlinuz)
        .arg("--rwdir")
        .arg(&shared)
        .arg("--exec")
        .arg(&guest_path)
        .current_dir(root())
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        .spawn()
        .context("spawning vng (virtme-ng)")?;
    let mut reader = std::fs::File::open(&log)?;
    let mut pos = 0u64;
    let mut pump = |reader: &mut std::fs::File| -> anyhow::Result<()> {
        reader.seek(SeekFrom::Start(pos))?;
        let mut buf = String::new();
        let n = reader.read_to_string(&mut buf)?;
        pos += n as u64;
        eprint!("{buf}");
        Ok(())
    };
    let status = loop {
        if let Some(s) = vm.try_wait()? {
            break s;
        }
        if started.elapsed() > VM_TIMEOUT {
            let _ = vm.kill();
            let _ = vm.wait();
            pump(&mut reader)?;
            bail!(
                "{kernel} VM still running after {} min: stopped (console: {})",
                VM_TIMEOUT.as_secs() / 60,
                work.join("console.log").display()
            );
        }
        pump(&mut reader)?;
        std::thread::sleep(Duration::from_secs(1));
    };
    pump(&mut reader)?;
    let took = started.elapsed();
    let mut failed = Vec::new();
    for (name, _) in binaries {
        match std::fs::read_to_string(shared.join(format!("rc-{name}"))) {
            Ok(rc) if rc.trim() == "0" => {}
            Ok(rc) => failed.push(format!("{name} exited {}", rc.trim())),
            Err(_) => failed.push(format!("{name} never reported (VM crashed or stopped)")),
        }
    }
    eprintln!(
        "xtask: {kernel} VM: {} binaries in {:.0} s (vng {status})",
        binaries.len(),
        took.as_secs_f64()
    );
    if !failed.is_empty() {
        let console = work.join("console.log");
        let tail = tail_lines(&console, 30);
        bail!(
            "on the {kernel} kernel: {}\nlast console lines ({}):\n{tail}",
            failed.join("; "),
            console.display()
        );
    }
    Ok(())
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
