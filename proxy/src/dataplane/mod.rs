//! The `Dataplane` trait every backend implements, plus the `none` backend, a recording fake
//! and a fault-injecting wrapper used in tests.

use std::sync::{Arc, Mutex};

use switchyard_model::{ChangeSet, DesiredState};

use crate::error::DataplaneError;

/// A backend that programs the desired state into the kernel.
///
/// `apply` gets only what changed (plus the whole new state, for backends that render in
/// full); `full_sync` makes the kernel match `state` exactly, repairing drift; `cleanup`
/// removes everything the backend ever created.
pub trait Dataplane: Send {
    fn name(&self) -> &'static str;
    fn apply(&mut self, changes: &ChangeSet, state: &DesiredState) -> Result<(), DataplaneError>;
    fn full_sync(&mut self, state: &DesiredState) -> Result<(), DataplaneError>;
    fn cleanup(&mut self) -> Result<(), DataplaneError>;
}

/// Programs nothing: for DNS-only nodes and for dry runs.
#[derive(Debug, Default)]
pub struct NoneDataplane;

impl Dataplane for NoneDataplane {
    fn name(&self) -> &'static str {
        "none"
    }
    fn apply(&mut self, _: &ChangeSet, _: &DesiredState) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn full_sync(&mut self, _: &DesiredState) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
}

/// One call a dataplane received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Apply {
        changes: ChangeSet,
        state_len: usize,
    },
    FullSync {
        state: DesiredState,
    },
    Cleanup,
}

/// Records every call, for tests of the sync loop.
#[derive(Debug, Clone, Default)]
pub struct RecordingDataplane {
    pub calls: Arc<Mutex<Vec<Call>>>,
}

impl RecordingDataplane {
    pub fn calls(&self) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn push(&self, c: Call) {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(c);
    }
}

impl Dataplane for RecordingDataplane {
    fn name(&self) -> &'static str {
        "recording"
    }
    fn apply(&mut self, changes: &ChangeSet, state: &DesiredState) -> Result<(), DataplaneError> {
        self.push(Call::Apply {
            changes: changes.clone(),
            state_len: state.len(),
        });
        Ok(())
    }
    fn full_sync(&mut self, state: &DesiredState) -> Result<(), DataplaneError> {
        self.push(Call::FullSync {
            state: state.clone(),
        });
        Ok(())
    }
    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        self.push(Call::Cleanup);
        Ok(())
    }
}

/// Wraps a dataplane and fails the calls whose 1-based numbers are listed.
#[derive(Debug)]
pub struct FaultyDataplane<D> {
    pub inner: D,
    pub fail_calls: Vec<usize>,
    calls: usize,
}

impl<D> FaultyDataplane<D> {
    pub fn new(inner: D, fail_calls: Vec<usize>) -> Self {
        FaultyDataplane {
            inner,
            fail_calls,
            calls: 0,
        }
    }

    fn tick(&mut self) -> Result<(), DataplaneError> {
        self.calls += 1;
        if self.fail_calls.contains(&self.calls) {
            return Err(DataplaneError::Injected {
                backend: "faulty",
                call: self.calls,
            });
        }
        Ok(())
    }
}

impl<D: Dataplane> Dataplane for FaultyDataplane<D> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn apply(&mut self, changes: &ChangeSet, state: &DesiredState) -> Result<(), DataplaneError> {
        self.tick()?;
        self.inner.apply(changes, state)
    }
    fn full_sync(&mut self, state: &DesiredState) -> Result<(), DataplaneError> {
        self.tick()?;
        self.inner.full_sync(state)
    }
    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        self.tick()?;
        self.inner.cleanup()
    }
}

/// Which backend `--backend` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    Auto,
    Ebpf,
    Iptables,
    Ipvs,
    None,
}

/// Build the chosen backend. Kernel backends arrive with their own issues; until then a
/// request for one fails with the reason instead of silently programming nothing.
pub fn select(choice: BackendChoice) -> Result<(Box<dyn Dataplane>, String), DataplaneError> {
    match choice {
        BackendChoice::None => Ok((Box::new(NoneDataplane), "requested".into())),
        BackendChoice::Ebpf => Err(DataplaneError::Unavailable {
            backend: "ebpf",
            reason: "not built into this version yet".into(),
        }),
        BackendChoice::Iptables => Err(DataplaneError::Unavailable {
            backend: "iptables",
            reason: "not built into this version yet".into(),
        }),
        BackendChoice::Ipvs => Err(DataplaneError::Unavailable {
            backend: "ipvs",
            reason: "not built into this version yet".into(),
        }),
        BackendChoice::Auto => Err(DataplaneError::Unavailable {
            backend: "auto",
            reason: "no kernel backend (ebpf, iptables) is built into this version yet; use --backend none".into(),
        }),
    }
}
