//! Target `engine_config` (fuzz/): the engine's config compiler and its expressions on
//! arbitrary event types; one function, called by the target and by the stable test that
//! replays its committed corpus (see `proto::fuzzing`). Built for tests and with the `fuzzing`
//! feature only.
//!
//! The input is `TOML config` + `\0` + device payloads separated by `\0`: the config is parsed
//! as the agent parses `[engine]` (an [`EngineSpec`]), compiled ([`Engine::new`]), and every
//! payload is sent under every declared event type twice (the second time a duplicate or a
//! later reading) and once as a replay.
//! Properties: no panic anywhere (config errors are errors, never panics; the engine "never
//! panics on input"); compiling is deterministic (two compilations process alike); an accepted
//! result names the topic's device and type, and survives the wire codec (what the outbox
//! stores).

use proto::{EventResult, wire};

use crate::{Engine, EngineSpec, Input, Outcome, State};

pub fn engine_config(data: &[u8]) {
    let mut parts = data.split(|&b| b == 0);
    let Some(Ok(config)) = parts.next().map(std::str::from_utf8) else {
        return;
    };
    let Ok(spec) = toml::from_str::<EngineSpec>(config) else {
        return;
    };
    let Ok(engine) = Engine::new(&spec) else {
        return;
    };
    let again = Engine::new(&spec).expect("a config that compiled once compiles again");
    let payloads: Vec<&[u8]> = parts.take(8).collect();
    let mut state = State::new();
    let mut twin = State::new();
    let mut received_at = 1_764_000_000_000i64;
    for (i, payload) in payloads.iter().enumerate() {
        for ty in spec.event_types.keys().take(4) {
            let device = format!("dev-{}", i % 2);
            let topic = format!("devices/{device}/events/{ty}");
            for replay in [false, false, true] {
                received_at += 60_000;
                let input = Input {
                    topic: &topic,
                    payload,
                    received_at,
                    gateway: "gw-fuzz",
                    via: proto::Via::Gateway,
                    replay,
                };
                let out = engine.process(&mut state, &input);
                let twin_out = again.process(&mut twin, &input);
                assert_eq!(
                    format!("{out:?}"),
                    format!("{twin_out:?}"),
                    "two compilations of one config disagree"
                );
                if let Outcome::Accepted { result, .. } = &out {
                    check(result, &device, ty);
                }
            }
        }
    }
}

fn check(r: &EventResult, device: &str, ty: &str) {
    assert_eq!(r.device, device);
    assert_eq!(r.event_type, ty);
    assert!(
        r.anomaly_score.is_finite(),
        "anomaly_score {}",
        r.anomaly_score
    );
    let back: EventResult = wire::decode(&wire::encode(r)).expect("result decodes");
    assert_eq!(&back, r, "result does not survive the wire codec");
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_engine_config_corpus_replays() {
        proto::fuzzing::replay("engine_config", super::engine_config);
    }
}
