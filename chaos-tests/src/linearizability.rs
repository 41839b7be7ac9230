//! A linearizability checker: Wing & Gong's search with Lowe's memoisation (as in
//! Porcupine and Knossos), over any sequential [`Model`].
//!
//! A history is a list of [`Operation`]s, each with the time it was called and, if an
//! answer came, the time it returned and what it returned. An operation with no answer
//! (the client timed out, or the server died) may have taken effect at any moment after
//! its call, or never: it is given a return time past every other and an unknown output,
//! so the search may place it anywhere after its call, including last (never seen).
//!
//! Owns only the search; clients record histories, models say what is legal.

use std::collections::HashSet;
use std::hash::Hash;

/// A sequential specification.
pub trait Model {
    type State: Clone + Eq + Hash;
    type Input;
    type Output;

    fn init(&self) -> Self::State;

    /// The states `input` can lead to from `state` when it returned `output` (`None`: the
    /// output is unknown). Empty: the operation cannot have returned that from `state`.
    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: Option<&Self::Output>,
    ) -> Vec<Self::State>;
}

/// One operation as a client saw it.
#[derive(Debug, Clone)]
pub struct Operation<I, O> {
    /// Who called it (for reports).
    pub client: usize,
    /// When it was called, in any monotonic unit shared by the whole history.
    pub call: u64,
    /// When its answer came, or `None` if none did.
    pub ret: Option<u64>,
    pub input: I,
    /// The answer, or `None` if none came.
    pub output: Option<O>,
}

/// Why a history is not linearizable, or could not be checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error(
        "not linearizable: no order explains operation {op} (client {client}); the longest explained prefix has {linearized} of {total} operations"
    )]
    NotLinearizable {
        op: usize,
        client: usize,
        linearized: usize,
        total: usize,
    },
    #[error("operation {0} returns before it is called")]
    Malformed(usize),
    #[error("the search visited over {0} states without an answer")]
    TooHard(usize),
}

/// The most search states visited before giving up with [`CheckError::TooHard`].
pub const MAX_STATES: usize = 20_000_000;

#[derive(Clone, Copy)]
struct Node {
    op: usize,
    is_call: bool,
    /// For a call: the index of its return node.
    partner: usize,
    prev: usize,
    next: usize,
}

const HEAD: usize = 0;

/// Checks `history` against `model`.
pub fn check<M: Model>(
    model: &M,
    history: &[Operation<M::Input, M::Output>],
) -> Result<(), CheckError> {
    let n = history.len();
    if n == 0 {
        return Ok(());
    }
    // Events: calls and returns, by time; at equal times calls first (overlapping
    // is the more permissive reading of a tie).
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, op) in history.iter().enumerate() {
        let ret = op.ret.unwrap_or(u64::MAX);
        if ret < op.call {
            return Err(CheckError::Malformed(i));
        }
        events.push((op.call, true, i));
        events.push((ret, false, i));
    }
    events.sort_by_key(|&(t, is_call, i)| (t, !is_call, i));
    // A doubly linked list with a sentinel head at 0.
    let mut nodes = vec![Node {
        op: usize::MAX,
        is_call: false,
        partner: 0,
        prev: 0,
        next: 1,
    }];
    let mut return_node = vec![0usize; n];
    let mut call_node = vec![0usize; n];
    for (k, &(_, is_call, op)) in events.iter().enumerate() {
        let idx = k + 1;
        nodes.push(Node {
            op,
            is_call,
            partner: 0,
            prev: idx - 1,
            next: if k + 1 == events.len() {
                usize::MAX
            } else {
                idx + 1
            },
        });
        if is_call {
            call_node[op] = idx;
        } else {
            return_node[op] = idx;
        }
    }
    for op in 0..n {
        nodes[call_node[op]].partner = return_node[op];
    }
    let unlink = |nodes: &mut Vec<Node>, i: usize| {
        let (p, nx) = (nodes[i].prev, nodes[i].next);
        nodes[p].next = nx;
        if nx != usize::MAX {
            nodes[nx].prev = p;
        }
    };
    let relink = |nodes: &mut Vec<Node>, i: usize| {
        let (p, nx) = (nodes[i].prev, nodes[i].next);
        nodes[p].next = i;
        if nx != usize::MAX {
            nodes[nx].prev = i;
        }
    };
    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, M::State)> = HashSet::new();
    // Each frame: the call node taken, the state before it, and the other states its
    // step allowed that are still to be tried.
    let mut stack: Vec<(usize, M::State, Vec<M::State>)> = Vec::new();
    let mut state = model.init();
    let mut entry = nodes[HEAD].next;
    let mut longest = 0usize;
    let mut visited = 0usize;
    let mut stuck_on = 0usize;
    while nodes[HEAD].next != usize::MAX {
        visited += 1;
        if visited > MAX_STATES {
            return Err(CheckError::TooHard(visited));
        }
        if entry != usize::MAX && nodes[entry].is_call {
            let op = nodes[entry].op;
            let mut nexts = model.step(&state, &history[op].input, history[op].output.as_ref());
            let mut took = false;
            linearized[op / 64] |= 1 << (op % 64);
            while let Some(next) = nexts.pop() {
                if seen.insert((linearized.clone(), next.clone())) {
                    stack.push((entry, state.clone(), nexts));
                    state = next;
                    unlink(&mut nodes, entry);
                    let partner = nodes[entry].partner;
                    unlink(&mut nodes, partner);
                    took = true;
                    break;
                }
            }
            if took {
                longest = longest.max(stack.len());
                entry = nodes[HEAD].next;
            } else {
                linearized[op / 64] &= !(1 << (op % 64));
                stuck_on = op;
                entry = nodes[entry].next;
            }
            continue;
        }
        // A return whose operation is not linearized yet (or the end): undo the last
        // choice and try its alternatives, then the next call after it.
        let Some((call, before, mut others)) = stack.pop() else {
            let op = stuck_on;
            return Err(CheckError::NotLinearizable {
                op,
                client: history[op].client,
                linearized: longest,
                total: n,
            });
        };
        let op = nodes[call].op;
        let partner = nodes[call].partner;
        relink(&mut nodes, partner);
        relink(&mut nodes, call);
        let mut retried = false;
        while let Some(next) = others.pop() {
            if seen.insert((linearized.clone(), next.clone())) {
                unlink(&mut nodes, call);
                unlink(&mut nodes, partner);
                stack.push((call, before.clone(), others));
                state = next;
                retried = true;
                break;
            }
        }
        if retried {
            entry = nodes[HEAD].next;
            continue;
        }
        linearized[op / 64] &= !(1 << (op % 64));
        state = before;
        entry = nodes[call].next;
    }
    Ok(())
}

/// A register keyed by revision: the model of one key in Brink's store (or etcd's).
///
/// Every write carries a value no other write carries, so a read's value names the write
/// it saw. Revisions come from the system: a write's answer says which one it got; after
/// a write whose answer is unknown the revision is unknown until a read shows it.
pub mod register {
    /// One key's state: its value (`None`: absent) and its mod revision, if known.
    #[derive(Debug, Clone, PartialEq, Eq, Hash)]
    pub struct State {
        pub value: Option<String>,
        pub revision: Option<u64>,
    }

    #[derive(Debug, Clone)]
    pub enum Input {
        /// Create the key, or update it unconditionally.
        Write(String),
        /// Update the key only if its mod revision is this.
        CompareAndSet {
            expect: u64,
            value: String,
        },
        Read,
    }

    #[derive(Debug, Clone)]
    pub enum Output {
        /// The write took effect at this revision.
        Written(u64),
        /// The compare-and-set found another revision (or no key).
        Conflict,
        /// The read saw this value at this mod revision, or no key.
        Value(Option<(String, u64)>),
    }

    /// The model.
    pub struct Register;

    fn after(state: &State, value: &str, revision: Option<u64>) -> Option<State> {
        // Revisions only grow: a write cannot land before the revision it overwrites.
        if let (Some(old), Some(new)) = (state.revision, revision)
            && new <= old
        {
            return None;
        }
        Some(State {
            value: Some(value.to_owned()),
            revision,
        })
    }

    impl super::Model for Register {
        type State = State;
        type Input = Input;
        type Output = Output;

        fn init(&self) -> State {
            State {
                value: None,
                revision: None,
            }
        }

        fn step(&self, state: &State, input: &Input, output: Option<&Output>) -> Vec<State> {
            match (input, output) {
                (Input::Write(v), Some(Output::Written(r))) => {
                    after(state, v, Some(*r)).into_iter().collect()
                }
                (Input::Write(v), None) => after(state, v, None).into_iter().collect(),
                (Input::CompareAndSet { expect, value }, Some(Output::Written(r))) => {
                    let matches =
                        state.value.is_some() && state.revision.is_none_or(|rev| rev == *expect);
                    if matches {
                        after(state, value, Some(*r)).into_iter().collect()
                    } else {
                        Vec::new()
                    }
                }
                (Input::CompareAndSet { expect, .. }, Some(Output::Conflict)) => {
                    let differs =
                        state.value.is_none() || state.revision.is_none_or(|rev| rev != *expect);
                    if differs {
                        vec![state.clone()]
                    } else {
                        Vec::new()
                    }
                }
                (Input::CompareAndSet { expect, value }, None) => {
                    let mut out = Vec::new();
                    if state.value.is_none() || state.revision.is_none_or(|rev| rev != *expect) {
                        out.push(state.clone());
                    }
                    if state.value.is_some() && state.revision.is_none_or(|rev| rev == *expect) {
                        // Its revision is unknown: the answer was lost.
                        out.extend(after(state, value, None));
                    }
                    out
                }
                (Input::Read, Some(Output::Value(None))) => {
                    if state.value.is_none() {
                        vec![state.clone()]
                    } else {
                        Vec::new()
                    }
                }
                (Input::Read, Some(Output::Value(Some((v, r))))) => {
                    let same = state.value.as_deref() == Some(v.as_str())
                        && state.revision.is_none_or(|rev| rev == *r);
                    if same {
                        vec![State {
                            value: Some(v.clone()),
                            revision: Some(*r),
                        }]
                    } else {
                        Vec::new()
                    }
                }
                // A read with no answer tells nothing.
                (Input::Read, None) => vec![state.clone()],
                _ => Vec::new(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::register::{Input, Output, Register};
    use super::*;

    fn op(
        client: usize,
        call: u64,
        ret: Option<u64>,
        input: Input,
        output: Option<Output>,
    ) -> Operation<Input, Output> {
        Operation {
            client,
            call,
            ret,
            input,
            output,
        }
    }

    fn w(v: &str) -> Input {
        Input::Write(v.into())
    }

    fn read(v: &str, r: u64) -> Option<Output> {
        Some(Output::Value(Some((v.into(), r))))
    }

    #[test]
    fn sequential_and_overlapping_histories_pass() {
        let h = vec![
            op(0, 0, Some(10), w("a"), Some(Output::Written(5))),
            op(1, 20, Some(30), Input::Read, read("a", 5)),
            // Overlapping write and read: the read may see either.
            op(0, 40, Some(60), w("b"), Some(Output::Written(7))),
            op(1, 45, Some(50), Input::Read, read("a", 5)),
            op(2, 55, Some(70), Input::Read, read("b", 7)),
            op(
                1,
                80,
                Some(90),
                Input::CompareAndSet {
                    expect: 7,
                    value: "c".into(),
                },
                Some(Output::Written(9)),
            ),
            op(
                2,
                95,
                Some(99),
                Input::CompareAndSet {
                    expect: 7,
                    value: "d".into(),
                },
                Some(Output::Conflict),
            ),
        ];
        assert_eq!(check(&Register, &h), Ok(()));
    }

    #[test]
    fn a_stale_read_after_a_completed_write_fails() {
        let h = vec![
            op(0, 0, Some(10), w("a"), Some(Output::Written(5))),
            op(0, 20, Some(30), w("b"), Some(Output::Written(6))),
            // Starts after b was acknowledged but sees a: stale.
            op(1, 40, Some(50), Input::Read, read("a", 5)),
        ];
        assert!(matches!(
            check(&Register, &h),
            Err(CheckError::NotLinearizable { op: 2, .. })
        ));
    }

    #[test]
    fn an_unanswered_write_may_land_late_or_never() {
        let lands = vec![
            op(0, 0, None, w("x"), None),
            op(1, 10, Some(20), Input::Read, Some(Output::Value(None))),
            op(1, 30, Some(40), Input::Read, read("x", 3)),
        ];
        assert_eq!(check(&Register, &lands), Ok(()));
        let never = vec![
            op(0, 0, None, w("x"), None),
            op(1, 10, Some(20), Input::Read, Some(Output::Value(None))),
        ];
        assert_eq!(check(&Register, &never), Ok(()));
        // But once seen, it cannot be unseen.
        let flicker = vec![
            op(0, 0, None, w("x"), None),
            op(1, 10, Some(20), Input::Read, read("x", 3)),
            op(1, 30, Some(40), Input::Read, Some(Output::Value(None))),
        ];
        assert!(check(&Register, &flicker).is_err());
    }

    #[test]
    fn revisions_going_backwards_fail() {
        let h = vec![
            op(0, 0, Some(10), w("a"), Some(Output::Written(8))),
            op(1, 20, Some(30), w("b"), Some(Output::Written(6))),
        ];
        assert!(check(&Register, &h).is_err());
    }

    #[test]
    fn a_compare_and_set_that_won_twice_fails() {
        let h = vec![
            op(0, 0, Some(10), w("a"), Some(Output::Written(5))),
            op(
                1,
                20,
                Some(30),
                Input::CompareAndSet {
                    expect: 5,
                    value: "b".into(),
                },
                Some(Output::Written(6)),
            ),
            op(
                2,
                20,
                Some(30),
                Input::CompareAndSet {
                    expect: 5,
                    value: "c".into(),
                },
                Some(Output::Written(7)),
            ),
        ];
        assert!(check(&Register, &h).is_err());
    }

    #[test]
    fn a_larger_concurrent_history_is_checked_quickly() {
        // 4 clients, 400 operations, each write read back by the next reader; built to
        // be linearizable, so the search must find the order.
        let mut h = Vec::new();
        let mut t = 0;
        let mut rev = 1;
        for i in 0..100 {
            let v = format!("v{i}");
            rev += 2;
            h.push(op(0, t, Some(t + 10), w(&v), Some(Output::Written(rev))));
            h.push(op(1, t + 1, Some(t + 12), Input::Read, None));
            h.push(op(2, t + 11, Some(t + 15), Input::Read, read(&v, rev)));
            h.push(op(
                3,
                t + 2,
                Some(t + 9),
                Input::Read,
                if i == 0 {
                    Some(Output::Value(None))
                } else {
                    read(&format!("v{}", i - 1), rev - 2)
                },
            ));
            t += 20;
        }
        assert_eq!(check(&Register, &h), Ok(()));
    }
}
