use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::value::{Enumerator, Object, Value};

/// This object exists for the `namespace` function.
///
/// It's special in that it behaves like a dictionary in many ways but it's the only
/// object that can be used with `{% set %}` assignments.  This is used internally
/// in the vm via downcasting.
#[derive(Debug, Default)]
pub(crate) struct Namespace {
    data: Mutex<BTreeMap<Arc<str>, Value>>,
}

impl Object for Namespace {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.data.lock().unwrap().get(some!(key.as_str())).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let data = self.data.lock().unwrap();
        let keys = data.keys().cloned().map(Value::from);
        Enumerator::Values(keys.collect())
    }
}

impl Namespace {
    pub(crate) fn set_value(&self, key: &str, value: Value) {
        self.data.lock().unwrap().insert(key.into(), value);
    }
}

// wick patch: a namespace that holds itself (`{% set s.w = [s] %}`) is a reference cycle that
// reference counting never frees, so every render of such a template leaked it. Namespaces made
// during a render are remembered on the rendering thread and emptied when the outermost render
// (`Template::render` / `render_to_write`) ends, which breaks any cycle through them. Nothing made
// during a render outlives it on those paths (the result is only the output text).
thread_local! {
    static RENDER_DEPTH: Cell<usize> = const { Cell::new(0) };
    static MADE_IN_RENDER: RefCell<Vec<Arc<Namespace>>> = const { RefCell::new(Vec::new()) };
}

/// wick patch: remembers `ns` when a render is running on this thread (see above).
pub(crate) fn remember_for_render(ns: &Arc<Namespace>) {
    if RENDER_DEPTH.with(Cell::get) > 0 {
        MADE_IN_RENDER.with(|made| made.borrow_mut().push(Arc::clone(ns)));
    }
}

/// wick patch: marks one render on this thread; the outermost one empties the namespaces made
/// during it when it is dropped.
pub(crate) struct RenderScope(());

impl RenderScope {
    pub(crate) fn enter() -> RenderScope {
        RENDER_DEPTH.with(|depth| depth.set(depth.get() + 1));
        RenderScope(())
    }
}

impl Drop for RenderScope {
    fn drop(&mut self) {
        let depth = RENDER_DEPTH.with(|depth| {
            let left = depth.get().saturating_sub(1);
            depth.set(left);
            left
        });
        if depth > 0 {
            return;
        }
        let made = MADE_IN_RENDER.with(|made| std::mem::take(&mut *made.borrow_mut()));
        for ns in made {
            // Take the values out first and drop them after the lock is released: dropping one
            // may drop another namespace.
            let values = match ns.data.lock() {
                Ok(mut data) => std::mem::take(&mut *data),
                Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
            };
            drop(values);
        }
    }
}
