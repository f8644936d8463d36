//! A packet tracer over the rendered rules: where would this packet go? Random branches are
//! all explored (the union of reachable endpoints is the answer); `recent` checks are taken
//! as a first packet (no affinity entry yet).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use switchyard_model::Protocol;

use super::render::{FILTER, Match, Rule, SERVICES, Target};

#[derive(Debug, Clone)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Protocol,
    pub dport: u16,
    /// Originated by a process on the node (addrtype --src-type LOCAL).
    pub src_local: bool,
    /// The node's own addresses (addrtype --dst-type LOCAL).
    pub local: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// DNATed to one of these endpoints; masqueraded or not.
    Dnat {
        endpoints: BTreeSet<(IpAddr, u16)>,
        masquerade: bool,
    },
    Reject,
    Drop,
    /// No rule of ours touched it.
    Accept,
}

struct Walk<'a> {
    chains: &'a BTreeMap<String, Vec<Rule>>,
    masq_mark: u32,
    drop_mark: u32,
}

#[derive(Debug, Clone, Default)]
struct State {
    mark: u32,
    dnat: Option<(IpAddr, u16)>,
}

fn matches(m: &Match, p: &Packet, st: &State) -> Option<bool> {
    Some(match m {
        Match::Src(n) => n.contains(&p.src),
        Match::NotSrc(n) => !n.contains(&p.src),
        Match::Dst(a) => *a == p.dst,
        Match::Proto(pr) => *pr == p.proto,
        Match::DPort(d) => *d == p.dport,
        Match::DstLocal => p.local.contains(&p.dst),
        Match::SrcLocal => p.src_local,
        Match::Mark(b) => st.mark & b == *b,
        Match::NotMark(b) => st.mark & b != *b,
        Match::RecentCheck { .. } => false,
        Match::RecentSet { .. } | Match::New => true,
        // Both outcomes are explored by the caller.
        Match::Random(_) => return None,
    })
}

impl Walk<'_> {
    /// Every terminal state reachable from `chain`. `None` in the result means the chain
    /// ended without a DNAT (falls through to the caller).
    fn chain(&self, name: &str, p: &Packet, st: State, depth: u32) -> Vec<(State, bool)> {
        let mut out = Vec::new();
        let mut frontier = vec![(st, 0usize)];
        let Some(rules) = self.chains.get(name) else {
            return vec![(frontier.remove(0).0, false)];
        };
        while let Some((mut st, mut i)) = frontier.pop() {
            let mut done = false;
            while i < rules.len() {
                let r = &rules[i];
                i += 1;
                let mut random = false;
                let mut ok = true;
                for m in &r.m {
                    match matches(m, p, &st) {
                        Some(true) => {}
                        Some(false) => ok = false,
                        None => random = true,
                    }
                }
                if !ok {
                    continue;
                }
                if random {
                    // Not taken: continue later from the next rule.
                    frontier.push((st.clone(), i));
                }
                match &r.t {
                    Target::Jump(c) if depth < 16 => {
                        let mut ended = false;
                        for (s2, terminal) in self.chain(c, p, st.clone(), depth + 1) {
                            if terminal {
                                out.push((s2, true));
                                ended = true;
                            } else {
                                st = s2;
                            }
                        }
                        if ended && !random {
                            done = true;
                            break;
                        }
                        if ended {
                            done = true;
                            break;
                        }
                    }
                    Target::Jump(_) => {}
                    Target::Dnat(a, port) => {
                        st.dnat = Some((*a, *port));
                        out.push((st.clone(), true));
                        done = true;
                        break;
                    }
                    Target::MarkOr(m) => st.mark |= m,
                    Target::MarkXor(m) => st.mark ^= m,
                    Target::Return => break,
                    Target::Masquerade | Target::Reject | Target::Drop => {}
                }
            }
            if !done {
                out.push((st, false));
            }
        }
        out
    }
}

/// Trace `p` through the nat and filter rules.
pub fn trace(
    nat: &BTreeMap<String, Vec<Rule>>,
    filter: &BTreeMap<String, Vec<Rule>>,
    masq_mark: u32,
    drop_mark: u32,
    p: &Packet,
) -> Outcome {
    let w = Walk {
        chains: nat,
        masq_mark,
        drop_mark,
    };
    let results = w.chain(SERVICES, p, State::default(), 0);
    let mut endpoints = BTreeSet::new();
    let mut masquerade = false;
    let mut marked_drop = false;
    for (st, _) in &results {
        if st.mark & w.drop_mark != 0 {
            marked_drop = true;
        }
        if let Some(d) = st.dnat {
            endpoints.insert(d);
            masquerade |= st.mark & w.masq_mark != 0;
        }
    }
    if marked_drop {
        return Outcome::Drop;
    }
    if !endpoints.is_empty() {
        return Outcome::Dnat {
            endpoints,
            masquerade,
        };
    }
    // Not translated: the filter verdicts apply to the original destination.
    for r in filter.get(FILTER).map(Vec::as_slice).unwrap_or_default() {
        if r.m
            .iter()
            .all(|m| matches(m, p, &State::default()).unwrap_or(false))
        {
            match r.t {
                Target::Reject => return Outcome::Reject,
                Target::Drop => return Outcome::Drop,
                _ => {}
            }
        }
    }
    Outcome::Accept
}
