//! The thin writer under the iptables backend: `*-save`, `*-restore --noflush` and single
//! `iptables` commands behind a small trait (as kube-proxy injects its iptables interface),
//! with the real implementation (the commands), a fake that keeps tables in memory and
//! applies restore input with the kernel's transaction rules, and a fault-injecting wrapper.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};

use switchyard_model::IpFamily;

use super::Flavor;

/// One iptables program: flavor and family (`ip6tables-nft`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tool {
    pub flavor: Flavor,
    pub family: IpFamily,
}

impl Tool {
    pub fn new(flavor: Flavor, family: IpFamily) -> Tool {
        Tool { flavor, family }
    }

    /// The command: `iptables-legacy`, `ip6tables-nft`, ...
    pub fn cmd(self) -> String {
        self.flavor.cmd(self.family)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("running {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error("{cmd}: injected fault on call {call}")]
    Injected { cmd: String, call: usize },
}

/// What the iptables backend needs from the outside world.
pub trait Runner: Send + std::fmt::Debug {
    /// `<tool>-save`: every table, as restore input.
    fn save(&mut self, tool: Tool) -> Result<String, RunError>;
    /// `<tool>-restore --noflush` with `input`; all of a table's changes or none.
    fn restore(&mut self, tool: Tool, input: &str) -> Result<(), RunError>;
    /// One `<tool> -w ARGS` command (cleanup deletes hooks this way).
    fn command(&mut self, tool: Tool, args: &[&str]) -> Result<(), RunError>;
}

/// The real commands.
#[derive(Debug, Default, Clone, Copy)]
pub struct CommandRunner;

/// Run `c` (named `cmd` in errors) with `stdin` fed to it; its stdout, or an error with its
/// stderr. Shared with the IPVS backend's `ip` and `ipset` calls.
pub fn output(cmd: &str, c: &mut Command, stdin: Option<&str>) -> Result<String, RunError> {
    let spawn = |source| RunError::Spawn {
        cmd: cmd.to_string(),
        source,
    };
    let mut child = c
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(spawn)?;
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if !out.status.success() {
        return Err(RunError::Failed {
            cmd: cmd.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Runner for CommandRunner {
    fn save(&mut self, tool: Tool) -> Result<String, RunError> {
        let cmd = format!("{}-save", tool.cmd());
        output(&cmd, &mut Command::new(&cmd), None)
    }

    fn restore(&mut self, tool: Tool, input: &str) -> Result<(), RunError> {
        let cmd = format!("{}-restore", tool.cmd());
        output(
            &cmd,
            Command::new(&cmd).args(["--noflush", "--wait"]),
            Some(input),
        )
        .map(drop)
    }

    fn command(&mut self, tool: Tool, args: &[&str]) -> Result<(), RunError> {
        let cmd = tool.cmd();
        output(&cmd, Command::new(&cmd).arg("-w").args(args), None).map(drop)
    }
}

const BUILTIN: [(&str, &[&str]); 2] = [
    ("nat", &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"]),
    ("filter", &["INPUT", "FORWARD", "OUTPUT"]),
];

fn builtin(table: &str, chain: &str) -> bool {
    BUILTIN
        .iter()
        .any(|(t, cs)| *t == table && cs.contains(&chain))
}

/// Chains of one table: name -> rule specs (as `-A` would take them).
type Table = BTreeMap<String, Vec<String>>;

/// The tables a fake holds for each tool.
#[derive(Debug, Default)]
pub struct FakeKernel {
    pub tables: BTreeMap<Tool, BTreeMap<String, Table>>,
    /// Every restore input that was applied, in order.
    pub restores: Vec<(Tool, String)>,
}

/// In-memory iptables: restore input is applied per table at `COMMIT`, all or nothing, with
/// `--noflush` semantics (declaring a chain flushes it; other chains are left alone). A
/// clone shares the same tables, so a test keeps a handle on what the backend wrote.
#[derive(Debug, Default, Clone)]
pub struct FakeRunner {
    kernel: Arc<Mutex<FakeKernel>>,
}

fn bad(tool: Tool, line: &str, why: &str) -> RunError {
    RunError::Failed {
        cmd: format!("{}-restore", tool.cmd()),
        stderr: format!("line {line:?}: {why}"),
    }
}

impl FakeRunner {
    pub fn kernel(&self) -> MutexGuard<'_, FakeKernel> {
        self.kernel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The rules as `*-save` would print them (without counters).
    pub fn dump(&self, tool: Tool) -> String {
        render(self.kernel().tables.get(&tool))
    }

    fn apply_table(tool: Tool, table: &str, t: &mut Table, lines: &[&str]) -> Result<(), RunError> {
        for l in lines {
            let mut w = l.split_whitespace();
            let (Some(op), Some(chain)) = (w.next(), w.next()) else {
                return Err(bad(tool, l, "empty"));
            };
            let rest: Vec<&str> = w.collect();
            let need = |t: &Table, c: &str| {
                if t.contains_key(c) || builtin(table, c) {
                    Ok(())
                } else {
                    Err(bad(tool, l, "no chain by that name"))
                }
            };
            match op {
                _ if op.starts_with(':') => {
                    let name = op.trim_start_matches(':').to_string();
                    t.insert(name, Vec::new());
                }
                "-A" => {
                    need(t, chain)?;
                    t.entry(chain.to_string()).or_default().push(rest.join(" "));
                }
                "-I" => {
                    need(t, chain)?;
                    let (pos, spec) = match rest.first().and_then(|p| p.parse::<usize>().ok()) {
                        Some(p) => (p.saturating_sub(1), rest[1..].join(" ")),
                        None => (0, rest.join(" ")),
                    };
                    let v = t.entry(chain.to_string()).or_default();
                    v.insert(pos.min(v.len()), spec);
                }
                "-D" => {
                    need(t, chain)?;
                    let spec = rest.join(" ");
                    let v = t.entry(chain.to_string()).or_default();
                    let i = v
                        .iter()
                        .position(|r| *r == spec)
                        .ok_or_else(|| bad(tool, l, "no such rule"))?;
                    v.remove(i);
                }
                "-F" => {
                    need(t, chain)?;
                    t.insert(chain.to_string(), Vec::new());
                }
                "-X" => {
                    if !t.get(chain).is_some_and(Vec::is_empty) {
                        return Err(bad(tool, l, "chain missing or not empty"));
                    }
                    let jump = format!("-j {chain}");
                    if t.values().flatten().any(|r| r.ends_with(&jump)) {
                        return Err(bad(tool, l, "chain still referenced"));
                    }
                    t.remove(chain);
                }
                _ => return Err(bad(tool, l, "unknown command")),
            }
        }
        Ok(())
    }
}

fn render(tables: Option<&BTreeMap<String, Table>>) -> String {
    let mut out = String::new();
    let Some(tables) = tables else {
        return out;
    };
    for (name, t) in tables {
        out.push_str(&format!("*{name}\n"));
        for c in t.keys() {
            let policy = if builtin(name, c) { "ACCEPT" } else { "-" };
            out.push_str(&format!(":{c} {policy} [0:0]\n"));
        }
        for (c, rules) in t {
            for r in rules {
                out.push_str(&format!("-A {c} {r}\n"));
            }
        }
        out.push_str("COMMIT\n");
    }
    out
}

impl Runner for FakeRunner {
    fn save(&mut self, tool: Tool) -> Result<String, RunError> {
        Ok(self.dump(tool))
    }

    fn restore(&mut self, tool: Tool, input: &str) -> Result<(), RunError> {
        let mut k = self.kernel();
        let mut table: Option<&str> = None;
        let mut lines: Vec<&str> = Vec::new();
        for l in input.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(t) = l.strip_prefix('*') {
                table = Some(t);
                lines.clear();
            } else if l == "COMMIT" {
                let name = table
                    .take()
                    .ok_or_else(|| bad(tool, l, "COMMIT outside a table"))?;
                let tables = k.tables.entry(tool).or_default();
                let mut t = tables.get(name).cloned().unwrap_or_default();
                Self::apply_table(tool, name, &mut t, &lines)?;
                tables.insert(name.to_string(), t);
                lines.clear();
            } else if table.is_some() {
                lines.push(l);
            } else if !l.starts_with('#') {
                return Err(bad(tool, l, "outside a table"));
            }
        }
        k.restores.push((tool, input.to_string()));
        Ok(())
    }

    fn command(&mut self, tool: Tool, args: &[&str]) -> Result<(), RunError> {
        let (table, rest) = match args {
            ["-t", t, rest @ ..] => (*t, rest),
            rest => ("filter", rest),
        };
        let mut k = self.kernel();
        let tables = k.tables.entry(tool).or_default();
        let mut t = tables.get(table).cloned().unwrap_or_default();
        Self::apply_table(tool, table, &mut t, &[&rest.join(" ")])?;
        tables.insert(table.to_string(), t);
        Ok(())
    }
}

/// Wraps a runner and fails the restores whose 1-based numbers are listed (nothing of a
/// failed restore is applied, as with a restore the kernel refuses).
#[derive(Debug)]
pub struct FaultyRunner<R> {
    pub inner: R,
    pub fail_restores: Vec<usize>,
    restores: usize,
}

impl<R> FaultyRunner<R> {
    pub fn new(inner: R, fail_restores: Vec<usize>) -> Self {
        FaultyRunner {
            inner,
            fail_restores,
            restores: 0,
        }
    }
}

impl<R: Runner> Runner for FaultyRunner<R> {
    fn save(&mut self, tool: Tool) -> Result<String, RunError> {
        self.inner.save(tool)
    }

    fn restore(&mut self, tool: Tool, input: &str) -> Result<(), RunError> {
        self.restores += 1;
        if self.fail_restores.contains(&self.restores) {
            return Err(RunError::Injected {
                cmd: format!("{}-restore", tool.cmd()),
                call: self.restores,
            });
        }
        self.inner.restore(tool, input)
    }

    fn command(&mut self, tool: Tool, args: &[&str]) -> Result<(), RunError> {
        self.inner.command(tool, args)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const T: Tool = Tool {
        flavor: Flavor::Nft,
        family: IpFamily::IPv4,
    };

    #[test]
    fn the_fake_applies_a_table_all_or_nothing() {
        let mut f = FakeRunner::default();
        f.restore(
            T,
            "*nat\n:SY-A - [0:0]\n-A SY-A -j RETURN\n-A PREROUTING -j SY-A\nCOMMIT\n",
        )
        .unwrap();
        let before = f.dump(T);
        assert!(before.contains("-A PREROUTING -j SY-A"), "{before}");
        // A jump to a chain that does not exist fails the whole table.
        let err = f
            .restore(
                T,
                "*nat\n:SY-A - [0:0]\n-A SY-A -j SY-B\n-A SY-B -j RETURN\nCOMMIT\n",
            )
            .unwrap_err();
        assert!(err.to_string().contains("no chain"), "{err}");
        assert_eq!(f.dump(T), before);
        // Declaring a chain flushes it; a referenced chain cannot be deleted.
        assert!(
            f.restore(T, "*nat\n:SY-A - [0:0]\n-X SY-A\nCOMMIT\n")
                .is_err()
        );
        f.command(T, &["-t", "nat", "-D", "PREROUTING", "-j", "SY-A"])
            .unwrap();
        f.restore(T, "*nat\n:SY-A - [0:0]\n-X SY-A\nCOMMIT\n")
            .unwrap();
        assert!(!f.dump(T).contains("SY-A"));
    }
}
