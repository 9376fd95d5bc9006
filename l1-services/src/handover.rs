//! Handing a running VM over to another owner — a new VMM process beneath it (live update) or
//! another host (migration) — written once. Each transport says how its steps travel
//! ([`Handover`]); [`hand_over`] runs them in order and decides, from where a failure lands,
//! who owns the guest afterwards:
//!
//! 1. **prepare** (the guest runs): the other side gets ready to receive;
//! 2. **pause**: the guest stops here;
//! 3. **state**: the VM state (and what goes with it: services, the last pages) is sent;
//! 4. **ready**: the other side has built the VM and can run it;
//! 5. **commit**: the other side is told to own the guest — the point of no return;
//! 6. **running**: it confirms.
//!
//! A failure before the commit rolls back: the transport undoes what it gave away and the
//! guest runs here again if it ran before. A failure after it leaves the guest *in doubt*:
//! the other side may run it, so this side must never run it on its own again. A transport
//! may send the commit right behind the state (one round trip less); then a lost answer is in
//! doubt too, but an explicit refusal of the state still rolls back (the other side said it
//! will not run the guest).

use std::fmt;

/// A step of the hand-over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The other side gets ready (the guest still runs).
    Prepare,
    /// The guest stops here.
    Pause,
    /// The state goes out.
    State,
    /// The other side says it can run the guest.
    Ready,
    /// The other side is told to own the guest.
    Commit,
    /// The other side confirms it owns the guest.
    Running,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Prepare => "prepare",
            Step::Pause => "pause",
            Step::State => "state",
            Step::Ready => "ready",
            Step::Commit => "commit",
            Step::Running => "running",
        })
    }
}

/// How the other side failed to become ready.
pub enum NotReady<E> {
    /// It answered that it will not run the guest: safe to roll back even after an early
    /// commit.
    Refused(E),
    /// No answer (a lost link, a dead process, a missed deadline).
    Lost(E),
}

/// One transport's steps, in the order [`hand_over`] calls them.
pub trait Handover {
    /// The transport's error.
    type Error;

    /// Gets the other side ready while the guest runs (a transport whose preparation ran
    /// earlier reports its outcome here).
    fn prepare(&mut self) -> Result<(), Self::Error>;
    /// Stops the guest; true when it ran (a rollback runs it again).
    fn pause(&mut self) -> Result<bool, Self::Error>;
    /// Captures the VM state (the guest is paused) and sends it with whatever goes with it.
    fn send_state(&mut self) -> Result<(), Self::Error>;
    /// The commit travels right behind the state, before the other side is ready.
    fn early_commit(&self) -> bool {
        false
    }
    /// Waits until the other side has built the VM and can run it.
    fn await_ready(&mut self) -> Result<(), NotReady<Self::Error>>;
    /// Tells the other side to own the guest (the point of no return once sent).
    fn commit(&mut self) -> Result<(), Self::Error>;
    /// Waits until the other side confirms it owns the guest.
    fn await_running(&mut self) -> Result<(), Self::Error>;
    /// Takes back what `send_state` gave away here (before the commit point only).
    fn undo(&mut self) {}
    /// Runs the guest here again after a rollback (only called when it ran before).
    fn resume(&mut self) -> Result<(), Self::Error>;
}

/// A hand-over that did not complete.
pub struct Failure<E> {
    /// The step that failed.
    pub step: Step,
    /// Why.
    pub error: E,
    /// The commit may have reached the other side: it may run the guest, so this side must
    /// not (nothing was rolled back). False: rolled back, the guest is here as it was.
    pub in_doubt: bool,
    /// Rolled back, but the guest that ran before could not be run again here.
    pub resume_error: Option<E>,
}

impl<E> Failure<E> {
    /// The guest was paused here by the hand-over (false: it failed while preparing).
    pub fn paused(&self) -> bool {
        self.step != Step::Prepare
    }
}

/// Runs the hand-over's steps; Ok(ran): the other side owns the guest, which ran here before
/// the pause (false: its operator had paused it).
pub fn hand_over<H: Handover>(h: &mut H) -> Result<bool, Failure<H::Error>> {
    let fail = |step, error, in_doubt| Failure {
        step,
        error,
        in_doubt,
        resume_error: None,
    };
    h.prepare().map_err(|e| fail(Step::Prepare, e, false))?;
    let ran = h.pause().map_err(|e| fail(Step::Pause, e, false))?;
    let rollback = |h: &mut H, step, error| {
        h.undo();
        let resume_error = if ran { h.resume().err() } else { None };
        Failure {
            step,
            error,
            in_doubt: false,
            resume_error,
        }
    };
    if let Err(e) = h.send_state() {
        return Err(rollback(h, Step::State, e));
    }
    let early = h.early_commit();
    if early {
        h.commit().map_err(|e| fail(Step::Commit, e, true))?;
    }
    match h.await_ready() {
        Ok(()) => {}
        Err(NotReady::Refused(e)) => return Err(rollback(h, Step::Ready, e)),
        Err(NotReady::Lost(e)) if early => return Err(fail(Step::Ready, e, true)),
        Err(NotReady::Lost(e)) => return Err(rollback(h, Step::Ready, e)),
    }
    if !early {
        h.commit().map_err(|e| fail(Step::Commit, e, true))?;
    }
    h.await_running()
        .map_err(|e| fail(Step::Running, e, true))?;
    Ok(ran)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transport that fails at one step and records what was called.
    struct Script {
        fail_at: Option<Step>,
        refuse: bool,
        early: bool,
        ran: bool,
        calls: Vec<&'static str>,
    }

    impl Script {
        fn new(fail_at: Option<Step>) -> Self {
            Script {
                fail_at,
                refuse: false,
                early: false,
                ran: true,
                calls: Vec::new(),
            }
        }

        fn step(&mut self, step: Step, name: &'static str) -> Result<(), String> {
            self.calls.push(name);
            if self.fail_at == Some(step) {
                Err(format!("{step} failed"))
            } else {
                Ok(())
            }
        }
    }

    impl Handover for Script {
        type Error = String;
        fn prepare(&mut self) -> Result<(), String> {
            self.step(Step::Prepare, "prepare")
        }
        fn pause(&mut self) -> Result<bool, String> {
            self.step(Step::Pause, "pause").map(|_| self.ran)
        }
        fn send_state(&mut self) -> Result<(), String> {
            self.step(Step::State, "state")
        }
        fn early_commit(&self) -> bool {
            self.early
        }
        fn await_ready(&mut self) -> Result<(), NotReady<String>> {
            let refuse = self.refuse;
            self.step(Step::Ready, "ready").map_err(|e| {
                if refuse {
                    NotReady::Refused(e)
                } else {
                    NotReady::Lost(e)
                }
            })
        }
        fn commit(&mut self) -> Result<(), String> {
            self.step(Step::Commit, "commit")
        }
        fn await_running(&mut self) -> Result<(), String> {
            self.step(Step::Running, "running")
        }
        fn undo(&mut self) {
            self.calls.push("undo");
        }
        fn resume(&mut self) -> Result<(), String> {
            self.calls.push("resume");
            Ok(())
        }
    }

    #[test]
    fn every_step_in_order_when_all_goes_well() {
        let mut s = Script::new(None);
        assert!(matches!(hand_over(&mut s), Ok(true)));
        assert_eq!(
            s.calls,
            ["prepare", "pause", "state", "ready", "commit", "running"]
        );
    }

    #[test]
    fn failures_before_the_commit_roll_back_and_after_it_are_in_doubt() {
        for (at, in_doubt, tail) in [
            (Step::Prepare, false, &[][..]),
            (Step::Pause, false, &[][..]),
            (Step::State, false, &["undo", "resume"][..]),
            (Step::Ready, false, &["undo", "resume"][..]),
            (Step::Commit, true, &[][..]),
            (Step::Running, true, &[][..]),
        ] {
            let mut s = Script::new(Some(at));
            let f = hand_over(&mut s).expect_err("fails");
            assert_eq!((f.step, f.in_doubt), (at, in_doubt), "{at}");
            assert!(s.calls.ends_with(tail), "{at}: {:?}", s.calls);
            assert!(!s.calls.contains(&"resume") || !in_doubt);
        }
    }

    #[test]
    fn a_guest_paused_before_stays_paused_on_rollback() {
        let mut s = Script::new(Some(Step::Ready));
        s.ran = false;
        let f = hand_over(&mut s).expect_err("fails");
        assert!(!f.in_doubt);
        assert!(!s.calls.contains(&"resume"));
        assert!(s.calls.contains(&"undo"));
    }

    #[test]
    fn an_early_commit_is_in_doubt_unless_the_state_was_refused() {
        let mut lost = Script::new(Some(Step::Ready));
        lost.early = true;
        let f = hand_over(&mut lost).expect_err("fails");
        assert!(f.in_doubt);
        assert_eq!(lost.calls, ["prepare", "pause", "state", "commit", "ready"]);

        let mut refused = Script::new(Some(Step::Ready));
        refused.early = true;
        refused.refuse = true;
        let f = hand_over(&mut refused).expect_err("fails");
        assert!(!f.in_doubt);
        assert!(refused.calls.ends_with(&["undo", "resume"]));
    }
}
