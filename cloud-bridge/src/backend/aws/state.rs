//! The per-gateway sequence state in DynamoDB: conditional writes on the gateway's item.

use anyhow::Context as _;
use aws_sdk_dynamodb::types::AttributeValue;

use super::client::{conditional, err, get_u64, n, s};
use crate::backend::{Announce, BoxFuture, Claim, GatewayState, Notice, StateStore};

/// The DynamoDB side: conditional writes on the gateway's item. Every method returns
/// `Ok(false)` when its condition did not hold (someone else changed the state first).
#[derive(Clone, Debug)]
pub struct StateTable {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

fn pk(gateway: &str) -> AttributeValue {
    s(format!("gw#{gateway}"))
}

const CLAIM_ATTRS: &str = "p_from, p_to, p_key, p_at, p_owner";

impl StateTable {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        StateTable {
            client,
            table: table.into(),
        }
    }

    /// Strongly consistent read of the gateway's state.
    pub async fn read(&self, gateway: &str) -> anyhow::Result<GatewayState> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", pk(gateway))
            .consistent_read(true)
            .send()
            .await
            .map_err(err)
            .with_context(|| format!("DynamoDB GetItem {}", self.table))?;
        let Some(item) = out.item else {
            return Ok(GatewayState::default());
        };
        let claim = match item.get("p_key") {
            Some(AttributeValue::S(key)) => Some(Claim {
                from: get_u64(&item, "p_from")?.context("p_from missing")?,
                to: get_u64(&item, "p_to")?.context("p_to missing")?,
                key: key.clone(),
                at: get_u64(&item, "p_at")?.unwrap_or(0) as i64,
                owner: match item.get("p_owner") {
                    Some(AttributeValue::S(o)) => o.clone(),
                    _ => String::new(),
                },
            }),
            _ => None,
        };
        let garbage = match item.get("garbage") {
            Some(AttributeValue::Ss(v)) => v.clone(),
            _ => Vec::new(),
        };
        Ok(GatewayState {
            hwm: get_u64(&item, "hwm")?.unwrap_or(0),
            exists: true,
            claim,
            garbage,
        })
    }

    /// Claims `claim` if the state is still `seen` with no claim and no garbage.
    pub async fn claim(
        &self,
        gateway: &str,
        seen: &GatewayState,
        claim: &Claim,
    ) -> anyhow::Result<bool> {
        let cond = if seen.exists {
            "hwm = :hwm AND attribute_not_exists(p_key) AND \
             (attribute_not_exists(garbage) OR size(garbage) = :zero)"
        } else {
            "attribute_not_exists(pk)"
        };
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", pk(gateway))
            .update_expression(
                "SET hwm = if_not_exists(hwm, :hwm), p_from = :f, p_to = :t, p_key = :k, \
                 p_at = :at, p_owner = :o",
            )
            .condition_expression(cond)
            .expression_attribute_values(":hwm", n(seen.hwm))
            .expression_attribute_values(":f", n(claim.from))
            .expression_attribute_values(":t", n(claim.to))
            .expression_attribute_values(":k", s(&claim.key))
            .expression_attribute_values(":at", n(claim.at))
            .expression_attribute_values(":o", s(&claim.owner));
        if seen.exists {
            req = req.expression_attribute_values(":zero", n(0));
        }
        conditional(req.send().await)
    }

    /// Renews the claim's timestamp (before completing a claim made earlier).
    pub async fn refresh(&self, gateway: &str, claim: &Claim, at: i64) -> anyhow::Result<bool> {
        conditional(
            self.client
                .update_item()
                .table_name(&self.table)
                .key("pk", pk(gateway))
                .update_expression("SET p_at = :at")
                .condition_expression("p_key = :k")
                .expression_attribute_values(":k", s(&claim.key))
                .expression_attribute_values(":at", n(at))
                .send()
                .await,
        )
    }

    /// The claimed range is stored: hwm = claim.to, claim removed.
    pub async fn commit(&self, gateway: &str, claim: &Claim) -> anyhow::Result<bool> {
        conditional(
            self.client
                .update_item()
                .table_name(&self.table)
                .key("pk", pk(gateway))
                .update_expression(format!("SET hwm = :t REMOVE {CLAIM_ATTRS}"))
                .condition_expression("p_key = :k AND hwm = :h")
                .expression_attribute_values(":k", s(&claim.key))
                .expression_attribute_values(":t", n(claim.to))
                .expression_attribute_values(":h", n(claim.from - 1))
                .send()
                .await,
        )
    }

    /// Abandons a stale claim; its object (if it was written) becomes garbage.
    pub async fn take_over(&self, gateway: &str, claim: &Claim) -> anyhow::Result<bool> {
        conditional(
            self.client
                .update_item()
                .table_name(&self.table)
                .key("pk", pk(gateway))
                .update_expression(format!("REMOVE {CLAIM_ATTRS} ADD garbage :g"))
                .condition_expression("p_key = :k AND p_at = :at")
                .expression_attribute_values(":k", s(&claim.key))
                .expression_attribute_values(":at", n(claim.at))
                .expression_attribute_values(":g", AttributeValue::Ss(vec![claim.key.clone()]))
                .send()
                .await,
        )
    }

    /// Forgets garbage keys whose objects were deleted.
    pub async fn clear_garbage(&self, gateway: &str, keys: &[String]) -> anyhow::Result<()> {
        self.client
            .update_item()
            .table_name(&self.table)
            .key("pk", pk(gateway))
            .update_expression("DELETE garbage :g")
            .expression_attribute_values(":g", AttributeValue::Ss(keys.to_vec()))
            .send()
            .await
            .map_err(err)
            .context("DynamoDB UpdateItem (garbage)")?;
        Ok(())
    }

    /// Gives up on `from..=to` (never arrived after the replay requests): hwm = to, and the
    /// range is recorded as its own item (`missed#{gateway}#{from}`) for later correction.
    pub async fn skip(
        &self,
        gateway: &str,
        seen: &GatewayState,
        from: u64,
        to: u64,
        now: i64,
    ) -> anyhow::Result<bool> {
        let cond = if seen.exists {
            "hwm = :hwm AND attribute_not_exists(p_key) AND attribute_not_exists(garbage)"
        } else {
            "attribute_not_exists(pk)"
        };
        // The record first: a crash after it and before the hwm moves leaves a record of a
        // range that is still being waited for, which the next skip overwrites; the other
        // order could skip a range without a trace.
        let missed_pk = s(format!("missed#{gateway}#{from:020}"));
        self.client
            .put_item()
            .table_name(&self.table)
            .item("pk", missed_pk.clone())
            .item("gateway", s(gateway))
            .item("from", n(from))
            .item("to", n(to))
            .item("at", n(now))
            .send()
            .await
            .map_err(err)
            .context("DynamoDB PutItem (missed range)")?;
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", pk(gateway))
            .update_expression("SET hwm = :to")
            .condition_expression(cond)
            .expression_attribute_values(":to", n(to));
        if seen.exists {
            req = req.expression_attribute_values(":hwm", n(seen.hwm));
        }
        if !conditional(req.send().await)? {
            self.client
                .delete_item()
                .table_name(&self.table)
                .key("pk", missed_pk)
                .send()
                .await
                .map_err(err)
                .context("DynamoDB DeleteItem (missed range)")?;
            return Ok(false);
        }
        Ok(true)
    }
}

impl StateTable {
    fn announce_name(gateway: &str, notice: Notice) -> String {
        format!("{}#{gateway}#{}", notice.kind(), notice.number())
    }

    /// See [`StateStore::begin_announce`].
    pub async fn begin_announce(
        &self,
        gateway: &str,
        notice: Notice,
        owner: &str,
        now: i64,
        stale_before: i64,
    ) -> anyhow::Result<Announce> {
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(Self::announce_name(gateway, notice)))
            .item("gateway", s(gateway))
            .item("record", n(notice.number()))
            .item("state", s("pending"))
            .item("owner", s(owner))
            .item("at", n(now))
            .condition_expression(
                "attribute_not_exists(pk) OR (#s = :pending AND (#o = :owner OR #a < :stale))",
            )
            .expression_attribute_names("#s", "state")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_names("#a", "at")
            .expression_attribute_values(":pending", s("pending"))
            .expression_attribute_values(":owner", s(owner))
            .expression_attribute_values(":stale", n(stale_before))
            .send()
            .await;
        if conditional(put)
            .with_context(|| format!("DynamoDB PutItem {}", Self::announce_name(gateway, notice)))?
        {
            return Ok(Announce::Mine);
        }
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(Self::announce_name(gateway, notice)))
            .consistent_read(true)
            .send()
            .await
            .map_err(err)
            .with_context(|| {
                format!("DynamoDB GetItem {}", Self::announce_name(gateway, notice))
            })?;
        Ok(match out.item.as_ref().and_then(|i| i.get("state")) {
            Some(AttributeValue::S(v)) if v == "sent" => Announce::Done,
            // Gone in between (nobody deletes them) or pending elsewhere.
            _ => Announce::Busy,
        })
    }

    /// See [`StateStore::end_announce`].
    pub async fn end_announce(&self, gateway: &str, notice: Notice) -> anyhow::Result<()> {
        self.client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(Self::announce_name(gateway, notice)))
            .update_expression("SET #s = :sent")
            .expression_attribute_names("#s", "state")
            .expression_attribute_values(":sent", s("sent"))
            .send()
            .await
            .map_err(err)
            .with_context(|| {
                format!(
                    "DynamoDB UpdateItem {}",
                    Self::announce_name(gateway, notice)
                )
            })?;
        Ok(())
    }
}

impl StateStore for StateTable {
    fn begin_announce<'a>(
        &'a self,
        gateway: &'a str,
        notice: Notice,
        owner: &'a str,
        now: i64,
        stale_before: i64,
    ) -> BoxFuture<'a, Announce> {
        Box::pin(StateTable::begin_announce(
            self,
            gateway,
            notice,
            owner,
            now,
            stale_before,
        ))
    }
    fn end_announce<'a>(&'a self, gateway: &'a str, notice: Notice) -> BoxFuture<'a, ()> {
        Box::pin(StateTable::end_announce(self, gateway, notice))
    }
    fn read<'a>(&'a self, gateway: &'a str) -> BoxFuture<'a, GatewayState> {
        Box::pin(StateTable::read(self, gateway))
    }
    fn claim<'a>(
        &'a self,
        gateway: &'a str,
        seen: &'a GatewayState,
        claim: &'a Claim,
    ) -> BoxFuture<'a, bool> {
        Box::pin(StateTable::claim(self, gateway, seen, claim))
    }
    fn refresh<'a>(&'a self, gateway: &'a str, claim: &'a Claim, at: i64) -> BoxFuture<'a, bool> {
        Box::pin(StateTable::refresh(self, gateway, claim, at))
    }
    fn commit<'a>(&'a self, gateway: &'a str, claim: &'a Claim) -> BoxFuture<'a, bool> {
        Box::pin(StateTable::commit(self, gateway, claim))
    }
    fn take_over<'a>(&'a self, gateway: &'a str, claim: &'a Claim) -> BoxFuture<'a, bool> {
        Box::pin(StateTable::take_over(self, gateway, claim))
    }
    fn clear_garbage<'a>(&'a self, gateway: &'a str, keys: &'a [String]) -> BoxFuture<'a, ()> {
        Box::pin(StateTable::clear_garbage(self, gateway, keys))
    }
    fn skip<'a>(
        &'a self,
        gateway: &'a str,
        seen: &'a GatewayState,
        from: u64,
        to: u64,
        now: i64,
    ) -> BoxFuture<'a, bool> {
        Box::pin(StateTable::skip(self, gateway, seen, from, to, now))
    }
}
