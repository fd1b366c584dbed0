use super::{LocalObjects, LocalState};
use crate::backend::{Claim, ObjectStore, StateStore};

fn claim(from: u64, to: u64, key: &str) -> Claim {
    Claim {
        from,
        to,
        key: key.into(),
        at: 1,
        owner: "t".into(),
    }
}

#[tokio::test]
async fn state_conditions_match_the_dynamodb_ones() {
    let dir = tempfile::tempdir().unwrap();
    let s = LocalState::open(dir.path()).unwrap();
    let fresh = s.read("g").await.unwrap();
    assert!(!fresh.exists);
    let c1 = claim(1, 10, "k1");
    assert!(s.claim("g", &fresh, &c1).await.unwrap());
    assert!(!s.claim("g", &fresh, &c1).await.unwrap(), "state changed");
    let st = s.read("g").await.unwrap();
    assert_eq!(st.claim.as_ref(), Some(&c1));
    assert!(
        !s.claim("g", &st, &claim(1, 5, "k2")).await.unwrap(),
        "claimed"
    );
    assert!(!s.commit("g", &claim(1, 10, "other")).await.unwrap());
    assert!(s.commit("g", &c1).await.unwrap());
    assert!(!s.commit("g", &c1).await.unwrap(), "claim gone");
    let st = s.read("g").await.unwrap();
    assert_eq!((st.hwm, st.claim.is_none()), (10, true));

    // A stale claim taken over: its key becomes garbage, which blocks the next claim.
    let c2 = claim(11, 20, "k2");
    assert!(s.claim("g", &st, &c2).await.unwrap());
    assert!(s.take_over("g", &c2).await.unwrap());
    let st = s.read("g").await.unwrap();
    assert_eq!(st.garbage, vec!["k2".to_string()]);
    assert!(!s.claim("g", &st, &claim(11, 12, "k3")).await.unwrap());
    s.clear_garbage("g", &st.garbage).await.unwrap();
    let st = s.read("g").await.unwrap();
    assert!(s.skip("g", &st, 11, 15, 7).await.unwrap());
    drop(s);

    // It survives a restart.
    let s = LocalState::open(dir.path()).unwrap();
    let st = s.read("g").await.unwrap();
    assert_eq!((st.hwm, st.exists), (15, true));
}

#[tokio::test]
async fn objects_round_trip_and_refuse_escaping_keys() {
    let dir = tempfile::tempdir().unwrap();
    let o = LocalObjects::new(dir.path()).unwrap();
    o.put(
        "events/dt=2026-01-01/gateway=g/a.ndjson",
        b"x\n".to_vec(),
        "t",
    )
    .await
    .unwrap();
    o.put("failures/b.json", b"{}".to_vec(), "t").await.unwrap();
    assert_eq!(
        o.list("events/").await.unwrap(),
        vec!["events/dt=2026-01-01/gateway=g/a.ndjson".to_string()]
    );
    assert_eq!(
        o.get("failures/b.json").await.unwrap().as_deref(),
        Some(&b"{}"[..])
    );
    o.delete("failures/b.json").await.unwrap();
    o.delete("failures/b.json").await.unwrap();
    assert!(o.get("failures/b.json").await.unwrap().is_none());
    assert!(o.list("failures/").await.unwrap().is_empty());
    assert!(o.put("../x", vec![], "t").await.is_err());
    assert!(o.put("/x", vec![], "t").await.is_err());
}
