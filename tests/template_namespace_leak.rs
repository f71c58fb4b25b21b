//! F13: a chat template whose namespace holds itself (`{% set s.w = [s] %}`) is a reference cycle;
//! before the patch in `vendor/minijinja` every render leaked it. A counting global allocator (this
//! test binary only) shows the live heap does not grow with the number of renders.
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use wick::tokenizer::chat_template::ChatTemplate;

/// Bytes allocated and not yet freed, by every thread of this test binary.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn render_many(template: &ChatTemplate, times: usize) {
    let messages = serde_json::json!([{"role": "user", "content": "hi"}]);
    for _ in 0..times {
        template.render(&messages, true, None, None, None).unwrap();
    }
}

#[test]
fn a_namespace_that_holds_itself_is_freed_after_each_render() {
    // Big enough per render (a 64 KiB string inside the cycle) that a leak cannot hide in noise.
    let source = "{% set s = namespace(v='x' * 65536) %}{% set s.w = [s, s.v] %}{{ s.w | length }}";
    let template = ChatTemplate::new(source.to_string()).unwrap();
    render_many(&template, 5); // warm-up: lazily built state is allocated once
    let before = LIVE.load(Ordering::Relaxed);
    render_many(&template, 200);
    let grown = LIVE.load(Ordering::Relaxed) - before;
    // A leak would be >= 200 x 64 KiB = 12.5 MiB.
    assert!(
        grown < 1 << 20,
        "live heap grew by {grown} bytes over 200 renders"
    );
}
