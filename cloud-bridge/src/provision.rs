//! `cloud-bridge provision`: creates the bucket, event bus, table and DLQ queue named in the
//! config if they are missing (the local emulator, first-time setups). Idempotent: what exists
//! is left alone and reported as `exists`.

use anyhow::Context as _;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, CreateGlobalSecondaryIndexAction, GlobalSecondaryIndex,
    GlobalSecondaryIndexUpdate, KeySchemaElement, KeyType, Projection, ProjectionType,
    ScalarAttributeType,
};
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
use serde_json::{Value, json};

use crate::backend::aws::Aws;
use crate::backend::aws::devices::SWEEP_INDEX;
use crate::config::Config;

/// Creates what is missing; returns `{"bucket": "created"|"exists", "event_bus": ..., ...}`.
pub async fn provision(cfg: &Config, aws: &Aws) -> anyhow::Result<Value> {
    let a = &cfg.aws;

    let bucket = if aws.s3.head_bucket().bucket(&a.bucket).send().await.is_ok() {
        "exists"
    } else {
        let mut req = aws.s3.create_bucket().bucket(&a.bucket);
        let region = aws
            .s3
            .config()
            .region()
            .map(|r| r.to_string())
            .unwrap_or_default();
        if !region.is_empty() && region != "us-east-1" {
            req = req.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(region.as_str()))
                    .build(),
            );
        }
        match req.send().await {
            Ok(_) => "created",
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_bucket_already_owned_by_you()) =>
            {
                "exists"
            }
            Err(e) => {
                return Err(crate::backend::aws::err(e))
                    .with_context(|| format!("creating bucket {}", a.bucket));
            }
        }
    };

    let bus = if aws
        .eventbridge
        .describe_event_bus()
        .name(&a.event_bus)
        .send()
        .await
        .is_ok()
    {
        "exists"
    } else {
        match aws
            .eventbridge
            .create_event_bus()
            .name(&a.event_bus)
            .send()
            .await
        {
            Ok(_) => "created",
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_resource_already_exists_exception()) =>
            {
                "exists"
            }
            Err(e) => {
                return Err(crate::backend::aws::err(e))
                    .with_context(|| format!("creating event bus {}", a.event_bus));
            }
        }
    };

    let table = match aws
        .dynamodb
        .describe_table()
        .table_name(&a.table)
        .send()
        .await
    {
        Ok(d) if has_sweep_index(d.table()) => "exists",
        // A table of an older bridge: the gateway-less devices' sweep needs its index.
        Ok(_) => {
            let index = CreateGlobalSecondaryIndexAction::builder()
                .index_name(SWEEP_INDEX)
                .set_key_schema(Some(sweep_keys()?))
                .projection(keys_only())
                .build()?;
            aws.dynamodb
                .update_table()
                .table_name(&a.table)
                .set_attribute_definitions(Some(attributes()?))
                .global_secondary_index_updates(
                    GlobalSecondaryIndexUpdate::builder().create(index).build(),
                )
                .send()
                .await
                .map_err(crate::backend::aws::err)
                .with_context(|| format!("adding index {SWEEP_INDEX} to table {}", a.table))?;
            wait_table_active(aws, &a.table).await?;
            "index added"
        }
        Err(_) => {
            let r = aws
                .dynamodb
                .create_table()
                .table_name(&a.table)
                .set_attribute_definitions(Some(attributes()?))
                .key_schema(key("pk", KeyType::Hash)?)
                .global_secondary_indexes(
                    GlobalSecondaryIndex::builder()
                        .index_name(SWEEP_INDEX)
                        .set_key_schema(Some(sweep_keys()?))
                        .projection(keys_only())
                        .build()?,
                )
                .billing_mode(BillingMode::PayPerRequest)
                .send()
                .await;
            match r {
                Ok(_) => {
                    wait_table_active(aws, &a.table).await?;
                    "created"
                }
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|se| se.is_resource_in_use_exception()) =>
                {
                    "exists"
                }
                Err(e) => {
                    return Err(crate::backend::aws::err(e))
                        .with_context(|| format!("creating table {}", a.table));
                }
            }
        }
    };

    let queue = if aws
        .sqs
        .get_queue_url()
        .queue_name(&a.dlq_queue)
        .send()
        .await
        .is_ok()
    {
        "exists"
    } else {
        aws.sqs
            .create_queue()
            .queue_name(&a.dlq_queue)
            .send()
            .await
            .map_err(crate::backend::aws::err)
            .with_context(|| format!("creating queue {}", a.dlq_queue))?;
        "created"
    };

    Ok(json!({
        "bucket": {"name": a.bucket, "state": bucket},
        "event_bus": {"name": a.event_bus, "state": bus},
        "table": {"name": a.table, "state": table},
        "dlq_queue": {"name": a.dlq_queue, "state": queue},
    }))
}

/// The table's key `pk` and the sweep index's keys (see [`crate::backend::aws::devices`]).
fn attributes() -> anyhow::Result<Vec<AttributeDefinition>> {
    let def = |name: &str, t: ScalarAttributeType| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(t)
            .build()
    };
    Ok(vec![
        def("pk", ScalarAttributeType::S)?,
        def("sweep", ScalarAttributeType::S)?,
        def("due", ScalarAttributeType::N)?,
    ])
}

fn key(name: &str, t: KeyType) -> anyhow::Result<KeySchemaElement> {
    Ok(KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(t)
        .build()?)
}

fn sweep_keys() -> anyhow::Result<Vec<KeySchemaElement>> {
    Ok(vec![
        key("sweep", KeyType::Hash)?,
        key("due", KeyType::Range)?,
    ])
}

fn keys_only() -> Projection {
    Projection::builder()
        .projection_type(ProjectionType::KeysOnly)
        .build()
}

fn has_sweep_index(t: Option<&aws_sdk_dynamodb::types::TableDescription>) -> bool {
    t.is_some_and(|t| {
        t.global_secondary_indexes()
            .iter()
            .any(|i| i.index_name() == Some(SWEEP_INDEX))
    })
}

async fn wait_table_active(aws: &Aws, table: &str) -> anyhow::Result<()> {
    use aws_sdk_dynamodb::types::{IndexStatus, TableStatus};
    for _ in 0..120 {
        let d = aws
            .dynamodb
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(crate::backend::aws::err)?;
        let t = d.table();
        let indexes_active = t.is_some_and(|t| {
            t.global_secondary_indexes()
                .iter()
                .all(|i| i.index_status().is_none_or(|s| *s == IndexStatus::Active))
        });
        if t.and_then(|t| t.table_status()) == Some(&TableStatus::Active) && indexes_active {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    anyhow::bail!("table {table} did not become ACTIVE within 60 s")
}
