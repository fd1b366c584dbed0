//! The correction history in the bridge's DynamoDB table, under `correction#{event_id}`,
//! written with `attribute_not_exists(pk)`.

use std::collections::HashMap;

use anyhow::Context as _;
use aws_sdk_dynamodb::types::AttributeValue;

use super::client::{conditional, err, get_u64, n, s};
use crate::backend::{BoxFuture, CorrectionHistory, CorrectionRecord};

#[derive(Clone, Debug)]
pub struct DynamoHistory {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

fn key(event_id: &str) -> AttributeValue {
    s(format!("correction#{event_id}"))
}

impl DynamoHistory {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        DynamoHistory {
            client,
            table: table.into(),
        }
    }

    async fn put_new_item(&self, r: &CorrectionRecord) -> anyhow::Result<bool> {
        let res = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", key(&r.event_id))
            .item("event_id", s(&r.event_id))
            .item("request", s(&r.request))
            .item("gateway", s(&r.gateway))
            .item("edge_seq", n(r.edge_seq))
            .item("reason", s(&r.reason))
            .item("at", n(r.at))
            .item("owner", s(&r.owner))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        conditional(res).with_context(|| format!("DynamoDB PutItem correction#{}", r.event_id))
    }

    async fn get_item(&self, event_id: &str) -> anyhow::Result<Option<CorrectionRecord>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", key(event_id))
            .consistent_read(true)
            .send()
            .await
            .map_err(err)
            .with_context(|| format!("DynamoDB GetItem correction#{event_id}"))?;
        let Some(item) = out.item else {
            return Ok(None);
        };
        let text = |k: &str| -> String {
            match item.get(k) {
                Some(AttributeValue::S(v)) => v.clone(),
                _ => String::new(),
            }
        };
        let num = |m: &HashMap<String, AttributeValue>, k: &str| get_u64(m, k);
        Ok(Some(CorrectionRecord {
            event_id: text("event_id"),
            request: text("request"),
            gateway: text("gateway"),
            edge_seq: num(&item, "edge_seq")?.unwrap_or(0),
            reason: text("reason"),
            at: num(&item, "at")?.unwrap_or(0) as i64,
            owner: text("owner"),
        }))
    }
}

impl CorrectionHistory for DynamoHistory {
    fn put_new<'a>(&'a self, rec: &'a CorrectionRecord) -> BoxFuture<'a, bool> {
        Box::pin(self.put_new_item(rec))
    }
    fn get<'a>(&'a self, event_id: &'a str) -> BoxFuture<'a, Option<CorrectionRecord>> {
        Box::pin(self.get_item(event_id))
    }
}
