//! The session table against a simple model, under random sequences of
//! admissions, completions, verified requests, removals and time passing:
//! the caps always hold, nothing expired is ever returned, an established
//! session is evicted only by a completed handshake when the table is full
//! and its least recently used session is old enough, and the table's
//! counts match the model's.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use atls_sessions::{ClientKey, Eviction, Phase, Policy, Refusal, SessionId, SessionTable};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    /// A first flight from client `c` (0..3), with flight bytes `f` (0..12,
    /// so some repeat).
    Admit { client: u8, flight: u8 },
    /// Complete the handshake of the n-th known session.
    Establish(usize),
    /// A verified request of the n-th known session.
    Touch(usize),
    /// Remove the n-th known session.
    Remove(usize),
    /// Time passes.
    Wait(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 0u8..12).prop_map(|(client, flight)| Op::Admit { client, flight }),
        4 => (0usize..10).prop_map(Op::Establish),
        2 => (0usize..10).prop_map(Op::Touch),
        1 => (0usize..10).prop_map(Op::Remove),
        2 => (0u16..2500).prop_map(Op::Wait),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Model {
    phase: Phase,
    created: Duration,
    last_used: Duration,
    client: u8,
    flight: u8,
}

fn policy() -> Policy {
    Policy {
        max_sessions: 4,
        max_half_open: 3,
        max_half_open_per_client: 2,
        handshake_timeout: Duration::from_secs(3),
        idle_timeout: Duration::from_secs(6),
        lifetime: Duration::from_secs(20),
        eviction: Eviction::LeastRecentlyUsed {
            min_idle: Duration::from_secs(2),
        },
        cid_len: 2,
    }
}

fn deadline(p: &Policy, m: &Model) -> Duration {
    match m.phase {
        Phase::HalfOpen => m.created + p.handshake_timeout.min(p.lifetime),
        Phase::Established => (m.last_used + p.idle_timeout).min(m.created + p.lifetime),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn the_table_behaves_like_its_model(ops in proptest::collection::vec(op(), 1..150)) {
        let p = policy();
        let t0 = Instant::now();
        let table: SessionTable<u32> = SessionTable::new(p);
        let mut model: HashMap<SessionId, Model> = HashMap::new();
        let mut known: Vec<SessionId> = Vec::new();
        let mut now = Duration::ZERO;
        for op in ops {
            // The model forgets what expired.
            model.retain(|_, m| deadline(&p, m) > now);
            match op {
                Op::Wait(ms) => now += Duration::from_millis(u64::from(ms)),
                Op::Admit { client, flight } => {
                    let half: Vec<&Model> = model.values().filter(|m| m.phase == Phase::HalfOpen).collect();
                    let established: Vec<&Model> = model.values().filter(|m| m.phase == Phase::Established).collect();
                    let lru_old_enough = established
                        .iter()
                        .map(|m| m.last_used)
                        .min()
                        .is_some_and(|used| used + Duration::from_secs(2) <= now);
                    let expected = if half.iter().any(|m| m.flight == flight) {
                        Err("duplicate_first_flight")
                    } else if half.len() >= p.max_half_open {
                        Err("half_open_full")
                    } else if half.iter().filter(|m| m.client == client).count() >= p.max_half_open_per_client {
                        Err("client_half_open_full")
                    } else if established.len() >= p.max_sessions && !lru_old_enough {
                        Err("table_full")
                    } else {
                        Ok(())
                    };
                    let key = Some(ClientKey::V4([10, 0, 0, client]));
                    match table.admit(key, &[flight], t0 + now) {
                        Ok(admission) => {
                            prop_assert_eq!(expected, Ok(()));
                            let found = admission.insert(0).expect("inserted");
                            model.insert(found.id, Model {
                                phase: Phase::HalfOpen,
                                created: now,
                                last_used: now,
                                client,
                                flight,
                            });
                            known.push(found.id);
                        }
                        Err(refusal) => prop_assert_eq!(expected, Err(refusal.reason())),
                    }
                }
                Op::Establish(i) => {
                    let Some(id) = known.get(i).copied() else { continue };
                    let result = table.establish(&id, t0 + now);
                    match model.get(&id).copied() {
                        None => prop_assert_eq!(result, Err(Refusal::Gone)),
                        Some(m) if m.phase == Phase::Established => prop_assert_eq!(result, Ok(())),
                        Some(_) => {
                            let established: Vec<(SessionId, Model)> = model
                                .iter()
                                .filter(|(_, m)| m.phase == Phase::Established)
                                .map(|(id, m)| (*id, *m))
                                .collect();
                            if established.len() >= p.max_sessions {
                                let victim = established.iter().min_by_key(|(_, m)| m.last_used).copied();
                                match victim {
                                    Some((victim, v)) if v.last_used + Duration::from_secs(2) <= now => {
                                        prop_assert_eq!(&result, &Ok(()));
                                        // Ties in last use: the table picks one of them.
                                        let evicted: Vec<SessionId> = established
                                            .iter()
                                            .filter(|(vid, _)| table.get(vid, t0 + now).is_none())
                                            .map(|(vid, _)| *vid)
                                            .collect();
                                        prop_assert_eq!(evicted.len(), 1);
                                        let gone = evicted[0];
                                        prop_assert_eq!(model[&gone].last_used, model[&victim].last_used);
                                        model.remove(&gone);
                                    }
                                    _ => {
                                        prop_assert!(matches!(result, Err(Refusal::Full { .. })), "{:?}", result);
                                        model.remove(&id);
                                        continue;
                                    }
                                }
                            } else {
                                prop_assert_eq!(&result, &Ok(()));
                            }
                            let m = model.get_mut(&id).expect("present");
                            m.phase = Phase::Established;
                            m.last_used = now;
                        }
                    }
                }
                Op::Touch(i) => {
                    let Some(id) = known.get(i).copied() else { continue };
                    table.touch(&id, t0 + now);
                    if let Some(m) = model.get_mut(&id) {
                        if m.phase == Phase::Established && now > m.last_used {
                            m.last_used = now;
                        }
                    }
                }
                Op::Remove(i) => {
                    let Some(id) = known.get(i).copied() else { continue };
                    table.remove(&id);
                    model.remove(&id);
                }
            }
            // Every known session is live in the table exactly when the model has it.
            model.retain(|_, m| deadline(&p, m) > now);
            for id in &known {
                let found = table.get(id, t0 + now);
                prop_assert_eq!(found.as_ref().map(|f| f.phase), model.get(id).map(|m| m.phase), "{:?}", id);
            }
            let stats = table.stats();
            let half = model.values().filter(|m| m.phase == Phase::HalfOpen).count();
            prop_assert_eq!(stats.half_open, half);
            prop_assert_eq!(stats.established, model.len() - half);
            prop_assert!(stats.half_open <= p.max_half_open);
            prop_assert!(stats.established <= p.max_sessions);
        }
    }
}
