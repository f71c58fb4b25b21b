//! The scheduler: a pure state machine over sequence ids, lengths and KV-cache slots. No tensors,
//! no channels. Each step it admits waiting sequences FCFS while a slot is free, then plans one
//! decode pass over every sequence whose prompt is in the cache and at most
//! `max_num_batched_tokens` prompt tokens of chunked prefill, so running streams keep flowing while
//! new prompts are read.
//!
//! Owned here: admission, slots, prefill chunking. Not here: sampling, stop conditions, events.

use std::collections::VecDeque;

use crate::models::SeqChunk;

/// Engine-wide id of a sequence.
pub type SeqId = u64;

/// Limits the scheduler works within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// KV-cache slots (sequences running at once).
    pub max_num_seqs: usize,
    /// Longest prompt + output per sequence (positions per slot).
    pub max_model_len: usize,
    /// Prompt tokens prefilled per step.
    pub max_num_batched_tokens: usize,
}

/// Why a sequence cannot be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The prompt leaves no room for one generated token.
    PromptTooLong {
        /// Prompt length in tokens.
        prompt_tokens: usize,
        /// The context limit.
        max_model_len: usize,
    },
    /// An empty prompt has no position to predict from.
    EmptyPrompt,
}

#[derive(Debug, Clone, Copy)]
struct Waiting {
    id: SeqId,
    prompt_len: usize,
}

#[derive(Debug, Clone, Copy)]
struct Running {
    id: SeqId,
    slot: usize,
    prompt_len: usize,
    /// Tokens whose K/V are in the slot (= position of the next token fed to the model).
    num_computed: usize,
}

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    /// The sequence.
    pub id: SeqId,
    /// Which tokens to feed: positions `chunk.start_pos..chunk.start_pos + chunk.len` of its tokens.
    pub chunk: SeqChunk,
    /// Whether this pass yields a token to sample (decode, or the last chunk of a prompt).
    pub samples: bool,
}

/// What to run in one engine step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Sequences that got a slot this step, with the slot.
    pub admitted: Vec<(SeqId, usize)>,
    /// One token each, for every sequence past its prompt: one batched forward pass.
    pub decode: Vec<Scheduled>,
    /// Prompt chunks within the step's token budget: one forward pass.
    pub prefill: Vec<Scheduled>,
}

impl StepPlan {
    /// Whether there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.decode.is_empty() && self.prefill.is_empty()
    }
}

/// Waiting and running sequences and the slot pool.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    waiting: VecDeque<Waiting>,
    running: Vec<Running>,
    /// Free slots; the lowest is handed out first.
    free_slots: Vec<usize>,
}

impl Scheduler {
    /// An empty scheduler with every slot free.
    pub fn new(config: SchedulerConfig) -> Self {
        Scheduler {
            config,
            waiting: VecDeque::new(),
            running: Vec::with_capacity(config.max_num_seqs),
            free_slots: (0..config.max_num_seqs).rev().collect(),
        }
    }

    /// Queues a sequence (FCFS).
    ///
    /// # Errors
    /// [`Rejection`] when the prompt is empty or can never fit with one generated token.
    pub fn enqueue(&mut self, id: SeqId, prompt_len: usize) -> Result<(), Rejection> {
        if prompt_len == 0 {
            return Err(Rejection::EmptyPrompt);
        }
        if prompt_len >= self.config.max_model_len {
            return Err(Rejection::PromptTooLong {
                prompt_tokens: prompt_len,
                max_model_len: self.config.max_model_len,
            });
        }
        self.waiting.push_back(Waiting { id, prompt_len });
        Ok(())
    }

    /// Removes a sequence wherever it is (finished, cancelled, failed) and frees its slot at once.
    /// Returns the freed slot, if it held one.
    pub fn remove(&mut self, id: SeqId) -> Option<usize> {
        if let Some(i) = self.running.iter().position(|r| r.id == id) {
            let slot = self.running.remove(i).slot;
            self.free_slots.push(slot);
            // Keep handing out the lowest free slot first.
            self.free_slots.sort_unstable_by(|a, b| b.cmp(a));
            return Some(slot);
        }
        if let Some(i) = self.waiting.iter().position(|w| w.id == id) {
            self.waiting.remove(i);
        }
        None
    }

    /// Admits waiting sequences while slots are free, then plans the step. The plan's chunks are
    /// counted as computed: if the forward pass fails, the engine removes those sequences.
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        while !self.waiting.is_empty() {
            let Some(slot) = self.free_slots.pop() else {
                break;
            };
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            self.running.push(Running {
                id: w.id,
                slot,
                prompt_len: w.prompt_len,
                num_computed: 0,
            });
            plan.admitted.push((w.id, slot));
        }
        let mut budget = self.config.max_num_batched_tokens;
        for r in &mut self.running {
            if r.num_computed >= r.prompt_len {
                let chunk = SeqChunk {
                    slot: r.slot,
                    start_pos: r.num_computed,
                    len: 1,
                };
                plan.decode.push(Scheduled {
                    id: r.id,
                    chunk,
                    samples: true,
                });
                r.num_computed += 1;
            } else if budget > 0 {
                let len = (r.prompt_len - r.num_computed).min(budget);
                budget -= len;
                let chunk = SeqChunk {
                    slot: r.slot,
                    start_pos: r.num_computed,
                    len,
                };
                r.num_computed += len;
                plan.prefill.push(Scheduled {
                    id: r.id,
                    chunk,
                    samples: r.num_computed == r.prompt_len,
                });
            }
        }
        plan
    }

    /// Sequences waiting for a slot.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences holding a slot.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Whether nothing is waiting or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// KV positions in use over all slots.
    pub fn kv_tokens_used(&self) -> usize {
        self.running.iter().map(|r| r.num_computed).sum()
    }

    /// Ids of every waiting and running sequence.
    pub fn all_ids(&self) -> Vec<SeqId> {
        self.running
            .iter()
            .map(|r| r.id)
            .chain(self.waiting.iter().map(|w| w.id))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(max_num_seqs: usize, budget: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            max_num_seqs,
            max_model_len: 64,
            max_num_batched_tokens: budget,
        })
    }

    #[test]
    fn admits_fcfs_while_slots_are_free_and_queues_the_rest() {
        let mut s = scheduler(2, 100);
        for id in 1..=3 {
            s.enqueue(id, 4).unwrap();
        }
        let plan = s.schedule();
        assert_eq!(plan.admitted, vec![(1, 0), (2, 1)]);
        assert_eq!(s.num_waiting(), 1);
        assert_eq!(s.num_running(), 2);
    }

    #[test]
    fn rejects_prompts_that_can_never_fit() {
        let mut s = scheduler(1, 100);
        assert_eq!(
            s.enqueue(1, 64),
            Err(Rejection::PromptTooLong {
                prompt_tokens: 64,
                max_model_len: 64
            })
        );
        assert_eq!(s.enqueue(2, 0), Err(Rejection::EmptyPrompt));
        assert!(s.enqueue(3, 63).is_ok());
    }

    #[test]
    fn prefill_is_chunked_within_the_token_budget() {
        let mut s = scheduler(2, 5);
        s.enqueue(1, 8).unwrap();
        s.enqueue(2, 3).unwrap();
        let p1 = s.schedule();
        assert_eq!(
            p1.prefill,
            vec![Scheduled {
                id: 1,
                chunk: SeqChunk {
                    slot: 0,
                    start_pos: 0,
                    len: 5
                },
                samples: false
            }]
        );
        let p2 = s.schedule();
        assert_eq!(
            p2.prefill,
            vec![
                Scheduled {
                    id: 1,
                    chunk: SeqChunk {
                        slot: 0,
                        start_pos: 5,
                        len: 3
                    },
                    samples: true
                },
                Scheduled {
                    id: 2,
                    chunk: SeqChunk {
                        slot: 1,
                        start_pos: 0,
                        len: 2
                    },
                    samples: false
                },
            ]
        );
        let p3 = s.schedule();
        // Sequence 1 decodes while sequence 2 finishes its prompt in the same step.
        assert_eq!(
            p3.decode,
            vec![Scheduled {
                id: 1,
                chunk: SeqChunk {
                    slot: 0,
                    start_pos: 8,
                    len: 1
                },
                samples: true
            }]
        );
        assert_eq!(
            p3.prefill,
            vec![Scheduled {
                id: 2,
                chunk: SeqChunk {
                    slot: 1,
                    start_pos: 2,
                    len: 1
                },
                samples: true
            }]
        );
        let p4 = s.schedule();
        assert_eq!(p4.decode.len(), 2);
        assert!(p4.prefill.is_empty());
        assert_eq!(s.kv_tokens_used(), 10 + 4);
    }

    #[test]
    fn removing_a_running_sequence_frees_its_slot_for_the_next_step() {
        let mut s = scheduler(1, 100);
        s.enqueue(1, 4).unwrap();
        s.enqueue(2, 4).unwrap();
        assert_eq!(s.schedule().admitted, vec![(1, 0)]);
        assert!(s.schedule().admitted.is_empty());
        assert_eq!(s.remove(1), Some(0));
        let plan = s.schedule();
        assert_eq!(plan.admitted, vec![(2, 0)]);
        assert_eq!(
            plan.prefill[0].chunk,
            SeqChunk {
                slot: 0,
                start_pos: 0,
                len: 4
            }
        );
    }

    #[test]
    fn removing_a_waiting_sequence_frees_nothing_and_drops_it() {
        let mut s = scheduler(1, 100);
        s.enqueue(1, 4).unwrap();
        s.enqueue(2, 4).unwrap();
        s.schedule();
        assert_eq!(s.remove(2), None);
        assert_eq!(s.num_waiting(), 0);
        assert_eq!(s.remove(1), Some(0));
        assert!(s.is_idle());
        assert!(s.schedule().is_empty());
    }

    #[test]
    fn lowest_free_slot_is_reused_first() {
        let mut s = scheduler(3, 100);
        for id in 1..=3 {
            s.enqueue(id, 2).unwrap();
        }
        s.schedule();
        s.remove(3);
        s.remove(1);
        s.enqueue(4, 2).unwrap();
        s.enqueue(5, 2).unwrap();
        assert_eq!(s.schedule().admitted, vec![(4, 0), (5, 2)]);
    }
}
