//! wick patch: bounds for walks over values (this whole file is wick's).
//!
//! Printing, serializing, comparing and hashing a value walk it recursively,
//! and values can share structure: `[x, x]` holds `x` twice without copying
//! it, so a list doubled this way 64 times is small in memory but has 2^64
//! leaves when it is walked.  Fuel is charged for the result of such a walk
//! only after it exists, and the recursion depth is the nesting depth of the
//! value, so a walk could exhaust memory, time or the native stack before
//! fuel was looked at.
//!
//! Two bounds apply to every walk:
//!
//! * While a template is evaluated with fuel (`Vm::do_eval` installs the
//!   tracker as the thread's *ambient* tracker), every item a walk visits is
//!   charged against it ([`charge_item`]).  Once the fuel is exhausted the
//!   walk stops early: printing stops writing, serialization fails,
//!   comparisons stop.  The tracker stays exhausted, so the evaluation fails
//!   with `OutOfFuel` at its next check.
//! * Walks nest at most [`MAX_WALK_DEPTH`] levels deep ([`enter`]), with or
//!   without fuel.  Deeper levels are not visited (and the ambient tracker, if
//!   any, is exhausted).
//!
//! Dropping a value is made non-recursive separately (see
//! [`drop_erased`]): it must never fail, so it defers deep levels instead.
use std::cell::{Cell, RefCell};

use crate::value::Value;
#[cfg(feature = "fuel")]
use crate::value::ValueRepr;

/// The deepest nesting a walk visits.  Real data (JSON from a request) is far
/// shallower; a walk of this depth uses well under a megabyte of stack.
pub(crate) const MAX_WALK_DEPTH: usize = 256;

thread_local! {
    static WALK_DEPTH: Cell<usize> = const { Cell::new(0) };
}

#[cfg(feature = "fuel")]
thread_local! {
    static AMBIENT: RefCell<Option<std::sync::Arc<crate::vm::fuel::FuelTracker>>> =
        const { RefCell::new(None) };
}

/// Makes a fuel tracker the thread's ambient tracker until dropped (then the
/// previous one is restored, so nested evaluations work).
#[cfg(feature = "fuel")]
pub(crate) struct AmbientFuel(Option<std::sync::Arc<crate::vm::fuel::FuelTracker>>);

#[cfg(feature = "fuel")]
impl AmbientFuel {
    pub(crate) fn enter(tracker: Option<&std::sync::Arc<crate::vm::fuel::FuelTracker>>) -> Self {
        let previous = AMBIENT
            .try_with(|ambient| ambient.replace(tracker.cloned()))
            .ok()
            .flatten();
        AmbientFuel(previous)
    }
}

#[cfg(feature = "fuel")]
impl Drop for AmbientFuel {
    fn drop(&mut self) {
        let previous = self.0.take();
        let _ = AMBIENT.try_with(|ambient| ambient.replace(previous));
    }
}

/// Charges `units` to the ambient tracker.  Returns `false` once the fuel is
/// exhausted (never without an ambient tracker).
#[inline]
fn charge(units: u64) -> bool {
    #[cfg(feature = "fuel")]
    {
        AMBIENT
            .try_with(|ambient| match *ambient.borrow() {
                Some(ref tracker) => tracker.consume(units).is_ok(),
                None => true,
            })
            .unwrap_or(true)
    }
    #[cfg(not(feature = "fuel"))]
    {
        let _ = units;
        true
    }
}

/// Exhausts the ambient tracker, if any, so the evaluation fails at its next
/// fuel check.
fn exhaust() {
    #[cfg(feature = "fuel")]
    {
        let _ = AMBIENT.try_with(|ambient| {
            if let Some(ref tracker) = *ambient.borrow() {
                let _ = tracker.ensure(u64::MAX);
            }
        });
    }
}

/// Checks that `bytes` more bytes could be paid for by the ambient tracker
/// (exhausting it if not), for code that has no `State` at hand.
#[cfg_attr(not(feature = "builtins"), allow(dead_code))]
pub(crate) fn ensure_bytes(bytes: usize) -> Result<(), crate::Error> {
    #[cfg(feature = "fuel")]
    {
        let units = crate::vm::fuel::cost_of(bytes, crate::vm::fuel::BYTE_COST);
        AMBIENT
            .try_with(|ambient| match *ambient.borrow() {
                Some(ref tracker) => tracker.ensure(units),
                None => Ok(()),
            })
            .unwrap_or(Ok(()))
    }
    #[cfg(not(feature = "fuel"))]
    {
        let _ = bytes;
        Ok(())
    }
}

/// Charges for visiting one item of a container in a walk: an item, plus the
/// bytes of a string item.  Returns `false` when the walk must stop.
#[inline]
pub(crate) fn charge_item(item: &Value) -> bool {
    #[cfg(feature = "fuel")]
    {
        use crate::vm::fuel::{cost_of, BYTE_COST, ITEM_COST};
        let bytes = match item.0 {
            ValueRepr::String(ref s, _) => s.len(),
            ValueRepr::SmallStr(ref s) => s.as_str().len(),
            ValueRepr::Bytes(ref b) => b.len(),
            _ => 0,
        };
        charge(ITEM_COST.saturating_add(cost_of(bytes, BYTE_COST)))
    }
    #[cfg(not(feature = "fuel"))]
    {
        let _ = item;
        true
    }
}

/// Charges one item per level the walk is deep (for pretty printing, where
/// every level adds work to every byte written below it).  Returns `false`
/// when the walk must stop.
pub(crate) fn charge_depth() -> bool {
    #[cfg(feature = "fuel")]
    {
        let depth = WALK_DEPTH.try_with(|depth| depth.get()).unwrap_or(0);
        charge(crate::vm::fuel::cost_of(depth, crate::vm::fuel::ITEM_COST))
    }
    #[cfg(not(feature = "fuel"))]
    {
        true
    }
}

/// One level of a walk; leaving it (drop) returns to the level above.
pub(crate) struct WalkLevel(());

impl Drop for WalkLevel {
    fn drop(&mut self) {
        let _ = WALK_DEPTH.try_with(|depth| depth.set(depth.get().saturating_sub(1)));
    }
}

/// Enters one level of a walk into a container.  Returns `None` (and exhausts
/// the ambient tracker) when the walk is already [`MAX_WALK_DEPTH`] deep or
/// the fuel is exhausted.
pub(crate) fn enter() -> Option<WalkLevel> {
    let depth = WALK_DEPTH.try_with(|depth| depth.get()).unwrap_or(0);
    if depth >= MAX_WALK_DEPTH {
        exhaust();
        return None;
    }
    if !charge(0) {
        return None;
    }
    let _ = WALK_DEPTH.try_with(|d| d.set(depth + 1));
    Some(WalkLevel(()))
}

/// Deepest chain of drops run recursively before the rest is deferred.
const MAX_DROP_DEPTH: usize = 128;

thread_local! {
    static DROP_DEPTH: Cell<usize> = const { Cell::new(0) };
    #[allow(clippy::type_complexity)]
    static DEFERRED_DROPS: RefCell<Vec<(*const (), fn(*const ()))>> = const { RefCell::new(Vec::new()) };
}

/// Releases a type-erased object (`decref(ptr)`) without unbounded recursion.
///
/// Dropping the last reference to a container drops its items, which can be
/// containers again: a 100,000-deep list overflowed the stack when it was
/// dropped.  Past [`MAX_DROP_DEPTH`] nested drops the release is queued and
/// the outermost drop runs the queue in a loop.
pub(crate) fn drop_erased(ptr: *const (), decref: fn(*const ())) {
    let Ok(depth) = DROP_DEPTH.try_with(|depth| depth.get()) else {
        // thread-local storage is being torn down: drop directly.
        decref(ptr);
        return;
    };
    if depth >= MAX_DROP_DEPTH {
        let deferred = DEFERRED_DROPS.try_with(|queue| queue.borrow_mut().push((ptr, decref)));
        if deferred.is_err() {
            decref(ptr);
        }
        return;
    }
    DROP_DEPTH.with(|d| d.set(depth + 1));
    decref(ptr);
    if depth == 0 {
        // the outermost drop releases what deeper drops deferred.
        while let Some((ptr, decref)) = DEFERRED_DROPS
            .try_with(|queue| queue.borrow_mut().pop())
            .ok()
            .flatten()
        {
            decref(ptr);
        }
    }
    DROP_DEPTH.with(|d| d.set(depth));
}
