//! The SDK clients, their retry and timeout policy, and the DynamoDB attribute helpers the
//! state table and the correction history share.
//!
//! Throttling, 5xx and timeouts are retried by the SDK's standard retry mode (exponential
//! backoff with jitter, [`SDK_ATTEMPTS`] attempts); what still fails is returned as an error and
//! the caller keeps the batch unacknowledged and tries again later.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::types::AttributeValue;

use crate::config::AwsConfig;

/// Attempts per AWS call inside the SDK (throttling, 5xx, timeouts, connection errors).
pub const SDK_ATTEMPTS: u32 = 6;
/// One attempt of an AWS call; the whole call (all attempts) is bounded by
/// [`OPERATION_TIMEOUT`], which the claim fencing in `pipeline` relies on.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// An SDK error with its whole chain of causes in the message (the SDK's own `Display` says
/// only "service error").
pub fn err<E: std::error::Error>(e: E) -> anyhow::Error {
    anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(e))
}

/// The SDK clients the bridge uses.
#[derive(Clone, Debug)]
pub struct Aws {
    pub s3: aws_sdk_s3::Client,
    pub eventbridge: aws_sdk_eventbridge::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub sqs: aws_sdk_sqs::Client,
}

impl Aws {
    /// Clients from the default credential chain and the config's region/endpoint.
    /// `AWS_ENDPOINT_URL` (read by the SDK) wins over `aws.endpoint_url`.
    pub async fn connect(cfg: &AwsConfig) -> Aws {
        let env_endpoint = std::env::var("AWS_ENDPOINT_URL")
            .ok()
            .filter(|v| !v.is_empty());
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(SDK_ATTEMPTS)
                    .with_initial_backoff(Duration::from_millis(100))
                    .with_max_backoff(Duration::from_secs(5)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .operation_timeout(OPERATION_TIMEOUT)
                    .build(),
            );
        if let Some(region) = &cfg.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if env_endpoint.is_none()
            && let Some(url) = &cfg.endpoint_url
        {
            loader = loader.endpoint_url(url.clone());
        }
        let overridden = env_endpoint.is_some() || cfg.endpoint_url.is_some();
        let shared = loader.load().await;
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&shared)
                .force_path_style(cfg.s3_force_path_style.unwrap_or(overridden))
                .build(),
        );
        Aws {
            s3,
            eventbridge: aws_sdk_eventbridge::Client::new(&shared),
            dynamodb: aws_sdk_dynamodb::Client::new(&shared),
            sqs: aws_sdk_sqs::Client::new(&shared),
        }
    }
}

pub(crate) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}
pub(crate) fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

pub(crate) fn get_u64(
    item: &HashMap<String, AttributeValue>,
    k: &str,
) -> anyhow::Result<Option<u64>> {
    match item.get(k) {
        None => Ok(None),
        Some(AttributeValue::N(v)) => Ok(Some(v.parse().with_context(|| format!("{k}: {v}"))?)),
        Some(other) => Err(anyhow!("{k}: expected a number, found {other:?}")),
    }
}

/// ConditionalCheckFailed → `Ok(false)`; any other error is returned.
pub(crate) fn conditional<T, E>(
    r: Result<T, aws_sdk_dynamodb::error::SdkError<E>>,
) -> anyhow::Result<bool>
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match r {
        Ok(_) => Ok(true),
        Err(e) => {
            if e.as_service_error()
                .and_then(|se| se.code())
                .is_some_and(|c| c == "ConditionalCheckFailedException")
            {
                Ok(false)
            } else {
                Err(err(e))
            }
        }
    }
}
