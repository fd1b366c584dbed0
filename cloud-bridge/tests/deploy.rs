//! `cloud-bridge/deploy/`: the SAM template's IAM policies and the gateways' IoT policy are
//! least privilege (only what the code calls, on the stack's own resources), and what the
//! template wires up agrees with the code it wires (the events it sends the Lambda, the
//! metric names its alarms and dashboard watch, the environment the Lambda reads, the
//! record shape its Glue table declares). cfn-lint checks the template itself (tests/run.sh).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use cloud_bridge::backend::aws::devices::SWEEP_INDEX;
use serde_json::{Map, Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// YAML → JSON (the template uses long-form intrinsics only, so there are no tags to lose).
fn to_json(y: &yaml_rust2::Yaml) -> Value {
    use yaml_rust2::Yaml;
    match y {
        Yaml::Real(r) => json!(r.parse::<f64>().unwrap()),
        Yaml::Integer(i) => json!(i),
        Yaml::String(s) => json!(s),
        Yaml::Boolean(b) => json!(b),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| {
                    let k = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        other => panic!("a non-string key: {other:?}"),
                    };
                    (k, to_json(v))
                })
                .collect(),
        ),
        Yaml::Null => Value::Null,
        other => panic!("unexpected YAML node (a tag or alias?): {other:?}"),
    }
}

fn template() -> Value {
    let text = std::fs::read_to_string(root().join("deploy/template.yaml")).unwrap();
    assert!(
        !text.lines().any(|l| {
            let l = l.trim_start();
            !l.starts_with('#')
                && regex_lite::Regex::new(
                    r":\s+!(Ref|Sub|GetAtt|Join|Select|Split|If|Not|Equals)\b",
                )
                .unwrap()
                .is_match(l)
        }),
        "short-form intrinsics (!Ref …): write Ref / Fn::Sub / Fn::GetAtt"
    );
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap();
    assert_eq!(docs.len(), 1);
    to_json(&docs[0])
}

fn resources(t: &Value) -> &Map<String, Value> {
    t["Resources"].as_object().unwrap()
}

fn one_or_many(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        other => vec![other.clone()],
    }
}

/// The AWS actions the bridge's code calls, from its sources: each SDK operation in
/// `src/backend/aws/` (the only place the bridge talks to AWS at run time; `provision.rs` is
/// the first-time setup tool, which the deployed stack replaces) mapped to its IAM action.
fn actions_the_code_calls() -> BTreeSet<String> {
    // SDK operation → IAM action. An operation missing here fails the test below, so a new
    // call cannot slip past the policies.
    let iam: BTreeMap<&str, &str> = [
        ("put_object", "s3:PutObject"),
        ("get_object", "s3:GetObject"),
        ("head_object", "s3:GetObject"),
        ("delete_object", "s3:DeleteObject"),
        ("delete_objects", "s3:DeleteObject"),
        ("copy_object", "s3:PutObject"),
        ("list_objects_v2", "s3:ListBucket"),
        ("get_item", "dynamodb:GetItem"),
        ("put_item", "dynamodb:PutItem"),
        ("update_item", "dynamodb:UpdateItem"),
        ("delete_item", "dynamodb:DeleteItem"),
        ("query", "dynamodb:Query"),
        ("scan", "dynamodb:Scan"),
        ("batch_get_item", "dynamodb:BatchGetItem"),
        ("batch_write_item", "dynamodb:BatchWriteItem"),
        ("transact_write_items", "dynamodb:TransactWriteItems"),
        ("put_events", "events:PutEvents"),
        ("send_message", "sqs:SendMessage"),
        ("send_message_batch", "sqs:SendMessage"),
        ("receive_message", "sqs:ReceiveMessage"),
        ("delete_message", "sqs:DeleteMessage"),
        ("delete_message_batch", "sqs:DeleteMessage"),
        ("change_message_visibility", "sqs:ChangeMessageVisibility"),
        ("get_queue_url", "sqs:GetQueueUrl"),
        ("get_queue_attributes", "sqs:GetQueueAttributes"),
    ]
    .into_iter()
    .collect();
    // A fluent SDK call starts with `client.operation()` (no arguments); every such name of
    // the map found in the sources is a call.
    let call = regex_lite::Regex::new(r"\.([a-z][a-z0-9_]*)\(\)").unwrap();
    let mut out = BTreeSet::new();
    let dir = root().join("src/backend/aws");
    for e in std::fs::read_dir(&dir).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        for c in call.captures_iter(&text) {
            if let Some(action) = iam.get(&c[1]) {
                out.insert(action.to_string());
            }
        }
    }
    assert!(out.len() >= 10, "{out:?}");
    out
}

/// Names of the stack's resources an intrinsic refers to; panics on anything that is not
/// one of them (a literal ARN, a wildcard).
fn resource_refs(r: &Value, names: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    match r {
        Value::Object(o) if o.contains_key("Fn::GetAtt") => {
            let a = o["Fn::GetAtt"].as_array().unwrap();
            assert_eq!(a[1], "Arn", "{r}");
            out.insert(a[0].as_str().unwrap().to_string());
        }
        Value::Object(o) if o.contains_key("Ref") => {
            out.insert(o["Ref"].as_str().unwrap().to_string());
        }
        Value::Object(o) if o.contains_key("Fn::Sub") => {
            let s = o["Fn::Sub"].as_str().expect("a plain Fn::Sub string");
            // `${Bucket.Arn}/*` (the bucket's objects) is the one wildcard: a bucket's objects
            // are named by the bridge at run time, and they are all in this stack's bucket.
            let rest = s.strip_suffix("/*").unwrap_or(s);
            assert!(!rest.contains('*'), "a wildcard in {s}");
            let var = regex_lite::Regex::new(r"\$\{([A-Za-z0-9]+)(\.[A-Za-z]+)?\}").unwrap();
            let refs: Vec<_> = var.captures_iter(s).map(|c| c[1].to_string()).collect();
            assert!(
                s.starts_with("${") && !refs.is_empty(),
                "{s}: must start from a resource of the stack"
            );
            out.extend(refs);
        }
        other => panic!("resource {other}: not a reference to one of the stack's resources"),
    }
    for n in &out {
        assert!(names.contains(n), "{n} is not a resource of this stack");
    }
    out
}

/// Resources whose actions AWS only grants on `*`: none of the functions needs one (metrics
/// go out as EMF log lines, not `cloudwatch:PutMetricData`, which would be the usual case;
/// X-Ray is off). An entry here would name the action and why.
const STAR_RESOURCE_EXCEPTIONS: &[&str] = &[];

/// (A call of an operation missing from the map would go unseen: the map has every
/// operation of these four services' SDKs a bridge like this could use.)
///
/// Actions a Lambda needs that are not the bridge's own SDK calls: writing its logs (into
/// its own log group), and, for an SQS event source, what the event source mapping calls on
/// the queue with the function's role.
const LOGS: [&str; 2] = ["logs:CreateLogStream", "logs:PutLogEvents"];
const SQS_EVENT_SOURCE: [&str; 3] = [
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:GetQueueAttributes",
];

#[test]
fn every_role_is_least_privilege() {
    let t = template();
    let res = resources(&t);
    let names: BTreeSet<String> = res.keys().cloned().collect();
    let code = actions_the_code_calls();

    // function → (role, its SQS event source queue)
    let mut functions = BTreeMap::new();
    for (name, r) in res {
        if r["Type"] != "AWS::Serverless::Function" {
            continue;
        }
        let role = r["Properties"]["Role"]["Fn::GetAtt"][0]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: its own role (Fn::GetAtt ROLE Arn)"))
            .to_string();
        let queues: Vec<String> = r["Properties"]["Events"]
            .as_object()
            .unwrap()
            .values()
            .filter(|e| e["Type"] == "SQS")
            .map(|e| {
                e["Properties"]["Queue"]["Fn::GetAtt"][0]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        functions.insert(name.clone(), (role, queues));
    }
    assert_eq!(
        functions.keys().map(String::as_str).collect::<Vec<_>>(),
        ["BridgeFunction", "DlqProcessorFunction"]
    );
    let roles: BTreeSet<&String> = functions.values().map(|(r, _)| r).collect();
    assert_eq!(roles.len(), functions.len(), "one role per function");

    let mut checked_roles = 0;
    for (name, r) in res {
        if r["Type"] != "AWS::IAM::Role" {
            continue;
        }
        checked_roles += 1;
        let p = &r["Properties"];
        assert!(
            p.get("ManagedPolicyArns").is_none(),
            "{name}: no managed policies"
        );
        // Trust: one AWS service, no account-wide principal.
        let trust = &p["AssumeRolePolicyDocument"]["Statement"];
        for s in trust.as_array().unwrap() {
            assert_eq!(s["Effect"], "Allow");
            assert_eq!(s["Action"], "sts:AssumeRole");
            let svc = s["Principal"]["Service"].as_str().unwrap();
            assert!(
                ["lambda.amazonaws.com", "iot.amazonaws.com"].contains(&svc),
                "{name}: {svc}"
            );
            assert_eq!(s["Principal"].as_object().unwrap().len(), 1, "{name}");
        }
        let mut granted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for pol in p["Policies"].as_array().unwrap() {
            for s in pol["PolicyDocument"]["Statement"].as_array().unwrap() {
                assert_eq!(s["Effect"], "Allow", "{name}: {s}");
                assert!(s.get("NotAction").is_none() && s.get("NotResource").is_none());
                let actions: Vec<String> = one_or_many(&s["Action"])
                    .iter()
                    .map(|a| a.as_str().unwrap().to_string())
                    .collect();
                for a in &actions {
                    assert!(!a.contains('*'), "{name}: wildcard action {a}");
                }
                for r in one_or_many(&s["Resource"]) {
                    if r == "*" {
                        assert!(
                            actions
                                .iter()
                                .all(|a| STAR_RESOURCE_EXCEPTIONS.contains(&a.as_str())),
                            "{name}: Resource \"*\" for {actions:?}"
                        );
                        continue;
                    }
                    for target in resource_refs(&r, &names) {
                        for a in &actions {
                            granted.entry(a.clone()).or_default().insert(target.clone());
                        }
                    }
                }
            }
        }
        let Some((function, (_, queues))) = functions.iter().find(|(_, (r, _))| r == name) else {
            // The IoT rules' role: the results queue and the rules' error log group only.
            assert_eq!(name, "IotRuleRole");
            assert_eq!(
                granted,
                BTreeMap::from([
                    (
                        "sqs:SendMessage".into(),
                        ["ResultsQueue".to_string()].into()
                    ),
                    (
                        "logs:CreateLogStream".into(),
                        ["IotRuleErrorLogGroup".to_string()].into()
                    ),
                    (
                        "logs:DescribeLogStreams".into(),
                        ["IotRuleErrorLogGroup".to_string()].into()
                    ),
                    (
                        "logs:PutLogEvents".into(),
                        ["IotRuleErrorLogGroup".to_string()].into()
                    ),
                ])
            );
            continue;
        };
        // Every action the code calls is granted (else AccessDenied at run time) …
        let actions: BTreeSet<String> = granted.keys().cloned().collect();
        let missing: Vec<_> = code.difference(&actions).collect();
        assert!(
            missing.is_empty(),
            "{function}: the code calls {missing:?}, not granted"
        );
        // … and nothing else, but its logs and its event source.
        for a in &actions {
            assert!(
                code.contains(a)
                    || LOGS.contains(&a.as_str())
                    || SQS_EVENT_SOURCE.contains(&a.as_str()),
                "{function}: {a} is granted but never called"
            );
        }
        // Each action on the resources it is for.
        let log_group = res
            .iter()
            .find(|(_, r)| {
                r["Type"] == "AWS::Logs::LogGroup"
                    && r["Properties"]["LogGroupName"]["Fn::Sub"]
                        .as_str()
                        .is_some_and(|n| {
                            n.ends_with(
                                res[function.as_str()]["Properties"]["FunctionName"]["Fn::Sub"]
                                    .as_str()
                                    .unwrap(),
                            )
                        })
            })
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| panic!("{function}: a log group of its own"));
        for (a, targets) in &granted {
            let expected: BTreeSet<String> = match a.split(':').next().unwrap() {
                "logs" => [log_group.clone()].into(),
                "s3" => ["ResultsBucket".to_string()].into(),
                "dynamodb" => ["StateTable".to_string()].into(),
                "events" => ["EventBus".to_string()].into(),
                "sqs" if SQS_EVENT_SOURCE.contains(&a.as_str()) => queues.iter().cloned().collect(),
                "sqs" => ["DlqQueue".to_string()].into(),
                other => panic!("{function}: {other}"),
            };
            assert_eq!(targets, &expected, "{function}: {a}");
        }
        // Object actions on objects, ListBucket on the bucket itself. ListBucket: `correction`
        // runs and the anomaly schedules list events/; the DLQ processor needs it for S3 to
        // answer a GET of an object that is not there with 404 rather than 403 (it recalculates
        // into a key that may not exist yet).
        let role = &res[name.as_str()]["Properties"]["Policies"];
        for s in role[0]["PolicyDocument"]["Statement"].as_array().unwrap() {
            let acts = one_or_many(&s["Action"]);
            if acts
                .iter()
                .any(|a| a.as_str().unwrap().starts_with("s3:Get"))
            {
                assert_eq!(s["Resource"]["Fn::Sub"], "${ResultsBucket.Arn}/*");
            }
            if acts.contains(&json!("s3:ListBucket")) {
                assert_eq!(
                    s["Resource"],
                    json!({"Fn::GetAtt": ["ResultsBucket", "Arn"]})
                );
            }
        }
    }
    assert_eq!(checked_roles, 3);

    // Query only on the sweep's index, never the table: the sweep is the one query.
    for (name, r) in res {
        if r["Type"] != "AWS::IAM::Role" {
            continue;
        }
        for pol in r["Properties"]["Policies"].as_array().unwrap() {
            for s in pol["PolicyDocument"]["Statement"].as_array().unwrap() {
                if one_or_many(&s["Action"]).contains(&json!("dynamodb:Query")) {
                    assert_eq!(s["Action"], "dynamodb:Query", "{name}: {s}");
                    assert_eq!(
                        s["Resource"]["Fn::Sub"],
                        format!("${{StateTable.Arn}}/index/{SWEEP_INDEX}"),
                        "{name}"
                    );
                }
            }
        }
    }
}

/// The table `provision` makes for the emulator and the one the stack makes must be one
/// schema: the sweep queries the index by name and keys.
#[test]
fn the_state_table_has_the_sweep_index() {
    let t = template();
    let table = &resources(&t)["StateTable"]["Properties"];
    let attrs: BTreeMap<&str, &str> = table["AttributeDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["AttributeName"].as_str().unwrap(),
                a["AttributeType"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        attrs,
        BTreeMap::from([("pk", "S"), ("sweep", "S"), ("due", "N")])
    );
    let gsi = table["GlobalSecondaryIndexes"].as_array().unwrap();
    assert_eq!(gsi.len(), 1);
    assert_eq!(gsi[0]["IndexName"], SWEEP_INDEX);
    assert_eq!(
        gsi[0]["KeySchema"],
        json!([
            {"AttributeName": "sweep", "KeyType": "HASH"},
            {"AttributeName": "due", "KeyType": "RANGE"}
        ])
    );
    assert_eq!(gsi[0]["Projection"]["ProjectionType"], "KEYS_ONLY");
    // Provisioned throughput would be refused on an on-demand table.
    assert!(gsi[0].get("ProvisionedThroughput").is_none());
    assert_eq!(table["BillingMode"], "PAY_PER_REQUEST");
}

/// What a gateway publishes and subscribes to (the agent's uplink, through `proto::uplink`).
fn gateway_topics(g: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    (
        [
            proto::uplink::results_topic(g),
            proto::uplink::status_topic(g),
        ]
        .into(),
        [proto::uplink::replay_topic(g)].into(),
    )
}

fn check_gateway_policy(doc: &Value, arn: &str) {
    const THING: &str = "${iot:Connection.Thing.ThingName}";
    let (publish, subscribe) = gateway_topics(THING);
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in doc["Statement"].as_array().unwrap() {
        assert_eq!(s["Effect"], "Allow", "{s}");
        let actions = one_or_many(&s["Action"]);
        for a in &actions {
            let a = a.as_str().unwrap();
            assert!(
                ["iot:Connect", "iot:Publish", "iot:Subscribe", "iot:Receive"].contains(&a),
                "{a}"
            );
        }
        for r in one_or_many(&s["Resource"]) {
            let r = r.as_str().unwrap();
            let rest = r
                .strip_prefix(arn)
                .unwrap_or_else(|| panic!("{r}: not under {arn}"));
            assert!(
                !rest.contains('*') && !rest.contains('+') && !rest.contains('#'),
                "{r}"
            );
            for a in &actions {
                seen.entry(a.as_str().unwrap().into())
                    .or_default()
                    .insert(rest.to_string());
            }
        }
        if actions.contains(&json!("iot:Connect")) {
            assert_eq!(
                s["Condition"]["Bool"]["iot:Connection.Thing.IsAttached"], "true",
                "connect only with a certificate attached to the thing"
            );
        }
    }
    let with = |kind: &str, topics: &BTreeSet<String>| -> BTreeSet<String> {
        topics.iter().map(|t| format!("{kind}/{t}")).collect()
    };
    assert_eq!(seen["iot:Connect"], [format!("client/{THING}")].into());
    assert_eq!(seen["iot:Publish"], with("topic", &publish));
    assert_eq!(seen["iot:Subscribe"], with("topicfilter", &subscribe));
    assert_eq!(seen["iot:Receive"], with("topic", &subscribe));
    assert_eq!(seen.len(), 4);
}

#[test]
fn the_gateway_policy_allows_only_its_own_client_id_and_topics() {
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/iot-gateway-policy.json")).unwrap(),
    )
    .unwrap();
    check_gateway_policy(&file, "arn:aws:iot:*:*:");

    // The stack's copy is the same document, scoped to its account and region.
    let t = template();
    let mut stack = resources(&t)["GatewayPolicy"]["Properties"]["PolicyDocument"].clone();
    let arn = "arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:";
    for s in stack["Statement"].as_array_mut().unwrap() {
        let subs = |v: &Value| -> Value {
            let s = v["Fn::Sub"].as_str().expect("Fn::Sub");
            json!(s.replace("${!", "${"))
        };
        s["Resource"] = match &s["Resource"] {
            Value::Array(a) => Value::Array(a.iter().map(subs).collect()),
            one => subs(one),
        };
    }
    check_gateway_policy(&stack, arn);
    let generic = serde_json::to_string(&stack)
        .unwrap()
        .replace(arn, "arn:aws:iot:*:*:");
    assert_eq!(serde_json::from_str::<Value>(&generic).unwrap(), file);
}

/// The schedules' InputTransformer output, with EventBridge's `<time>` filled in.
fn scheduled(t: &Value, rule: &str, time: &str) -> Value {
    let target = &resources(t)[rule]["Properties"]["Targets"][0];
    assert_eq!(target["Arn"]["Fn::GetAtt"][0], "BridgeFunction", "{rule}");
    let tr = &target["InputTransformer"];
    assert_eq!(tr["InputPathsMap"], json!({"time": "$.time"}));
    let text = tr["InputTemplate"]
        .as_str()
        .unwrap()
        .replace("<time>", &json!(time).to_string());
    serde_json::from_str(&text).unwrap()
}

fn recorded(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("tests/events").join(name)).unwrap())
        .unwrap()
}

#[test]
fn the_template_sends_the_lambda_the_shapes_it_handles() {
    let t = template();
    let res = resources(&t);
    // The anomaly schedules: exactly the recorded events tests/lambda.rs runs.
    for (rule, file, detail_type) in [
        (
            "AnomalyScanRule",
            "scheduled-anomaly-scan.json",
            cloud_bridge::lambda::ANOMALY_SCAN,
        ),
        (
            "AnomalyTrainRule",
            "scheduled-anomaly-train.json",
            cloud_bridge::lambda::ANOMALY_TRAIN,
        ),
        (
            "IngestSweepRule",
            "scheduled-ingest-sweep.json",
            cloud_bridge::lambda::INGEST_SWEEP,
        ),
    ] {
        let rec = recorded(file);
        assert_eq!(rec["detail-type"], detail_type);
        assert_eq!(
            scheduled(&t, rule, rec["time"].as_str().unwrap()),
            rec,
            "{rule}"
        );
    }
    // The alarm rule: the discrepancy alarm's ALARM state changes, as recorded.
    let pattern = &res["DiscrepancyAlarmRule"]["Properties"]["EventPattern"];
    let alarm = recorded("cloudwatch-alarm-state-change.json");
    assert_eq!(pattern["source"], json!([alarm["source"]]));
    assert_eq!(pattern["detail-type"], json!([alarm["detail-type"]]));
    assert_eq!(pattern["detail"]["state"]["value"], json!(["ALARM"]));
    assert!(
        res["DiscrepancyAlarmRule"]["Properties"]["Targets"][0]
            .get("Input")
            .is_none()
    );
    let metric = &alarm["detail"]["configuration"]["metrics"][0]["metricStat"]["metric"];
    let a = &res["DiscrepancyAlarm"]["Properties"];
    assert_eq!(a["MetricName"], metric["name"]);
    assert_eq!(a["MetricName"], cloud_bridge::metrics::DISCREPANCY_RATE);
    // The IoT rules: the bodies lambda.rs classifies (`{"cbor", "gateway"}` via the results
    // queue, `{"topic", …}` for devices).
    let sql = |r: &str| {
        res[r]["Properties"]["TopicRulePayload"]["Sql"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        sql("ResultsTopicRule"),
        format!(
            "SELECT encode(*, 'base64') AS cbor, topic(2) AS gateway FROM '{}'",
            proto::uplink::results_topic("+")
        )
    );
    let body: Value = serde_json::from_str(
        recorded("sqs-iot-results.json")["Records"][0]["body"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        body.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["cbor", "gateway"]
    );
    let action = &res["ResultsTopicRule"]["Properties"]["TopicRulePayload"]["Actions"][0]["Sqs"];
    assert_eq!(action["QueueUrl"], json!({"Ref": "ResultsQueue"}));
    assert_eq!(
        action["UseBase64"], false,
        "the body must stay the rule's JSON"
    );
    let engine =
        cloud_bridge::config::load_engine_spec(&root().join("../config/edge-agent.toml")).unwrap();
    let device_topic = engine::Engine::new(&engine)
        .unwrap()
        .topic()
        .subscription_filter();
    assert_eq!(
        sql("DevicesTopicRule"),
        format!("SELECT *, topic() AS topic FROM '{device_topic}'")
    );
    // The results queue feeds the bridge in batches, failures reported per record, and its
    // redrive goes to the bridge's DLQ (the one the DLQ processor reads).
    let results = &res["BridgeFunction"]["Properties"]["Events"]["Results"]["Properties"];
    assert_eq!(
        results["FunctionResponseTypes"],
        json!(["ReportBatchItemFailures"])
    );
    let dlq = &res["DlqProcessorFunction"]["Properties"];
    assert_eq!(
        dlq["Events"]["Dlq"]["Properties"]["FunctionResponseTypes"],
        json!(["ReportBatchItemFailures"])
    );
    assert!(dlq["ReservedConcurrentExecutions"].is_object());
    assert_eq!(
        res["ResultsQueue"]["Properties"]["RedrivePolicy"]["deadLetterTargetArn"],
        json!({"Fn::GetAtt": ["DlqQueue", "Arn"]})
    );
}

#[test]
fn alarms_and_the_dashboard_watch_metrics_the_bridge_publishes() {
    let src = std::fs::read_to_string(root().join("src/metrics.rs")).unwrap();
    let names: BTreeSet<String> =
        regex_lite::Regex::new(r#"pub const [A-Z0-9_]+: &str = "([a-z_0-9]+)";"#)
            .unwrap()
            .captures_iter(&src)
            .map(|c| c[1].to_string())
            .collect();
    assert!(
        names.contains("processed") && names.contains("discrepancy_rate"),
        "{names:?}"
    );
    // The Lambda's EMF dimensions.
    let m = cloud_bridge::metrics::Metrics::default();
    m.processed.increment(1);
    let emf = m.take_emf("NS", "lambda", 0).unwrap();
    assert_eq!(
        emf["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
        json!([["Service", "Mode"]])
    );
    let dims = json!([{"Name": "Service", "Value": emf["Service"]}, {"Name": "Mode", "Value": emf["Mode"]}]);

    let t = template();
    let res = resources(&t);
    let mut alarms = 0;
    for (name, r) in res {
        if r["Type"] != "AWS::CloudWatch::Alarm" || r["Properties"]["Namespace"] == "AWS/SQS" {
            continue;
        }
        alarms += 1;
        let p = &r["Properties"];
        assert_eq!(p["Namespace"], json!({"Ref": "MetricsNamespace"}), "{name}");
        assert!(names.contains(p["MetricName"].as_str().unwrap()), "{name}");
        assert_eq!(p["Dimensions"], dims, "{name}");
    }
    assert_eq!(alarms, 3);
    // Dashboard: every bridge metric it draws exists, with the same dimensions.
    let body = res["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
        .as_str()
        .unwrap()
        .replace("${MetricsNamespace}", "NS")
        .replace("${AWS::Region}", "eu-central-1")
        .replace("${DlqQueue.QueueName}", "q")
        .replace("${ResultsQueue.QueueName}", "q");
    let body: Value = serde_json::from_str(&body).unwrap();
    let mut drawn = BTreeSet::new();
    for w in body["widgets"].as_array().unwrap() {
        for m in w["properties"]["metrics"].as_array().unwrap() {
            let m = m.as_array().unwrap();
            if m[0] != "NS" {
                assert_eq!(m[0], "AWS/SQS");
                continue;
            }
            let metric = m[1].as_str().unwrap();
            assert!(
                names.contains(metric),
                "dashboard: {metric} is not a bridge metric"
            );
            assert_eq!(
                m[2..6],
                [
                    json!("Service"),
                    emf["Service"].clone(),
                    json!("Mode"),
                    emf["Mode"].clone()
                ]
            );
            drawn.insert(metric.to_string());
        }
    }
    for needed in [
        "processed",
        "ingested",
        "dead_lettered",
        "corrected",
        "anomalies",
        "gaps",
        "discrepancy_rate",
    ] {
        assert!(drawn.contains(needed), "the dashboard lacks {needed}");
    }
}

#[test]
fn the_lambda_reads_the_environment_and_package_the_template_gives_it() {
    let t = template();
    let env = t["Globals"]["Function"]["Environment"]["Variables"]
        .as_object()
        .unwrap();
    let mut vars: BTreeSet<&str> = env.keys().map(String::as_str).collect();
    assert!(vars.remove("CLOUD_BRIDGE_CONFIG"));
    let overrides: BTreeSet<&str> = cloud_bridge::config::Config::ENV_OVERRIDES
        .iter()
        .map(|(v, _)| *v)
        .filter(|v| *v != "CLOUD_BRIDGE_PREFIX")
        .collect();
    assert_eq!(
        vars, overrides,
        "the stack sets every resource name the bridge reads"
    );
    assert_eq!(env["CLOUD_BRIDGE_CONFIG"], "/var/task/cloud-bridge.toml");
    let f = &t["Globals"]["Function"];
    assert_eq!(
        (f["Runtime"].as_str(), f["Architectures"][0].as_str()),
        (Some("provided.al2023"), Some("arm64"))
    );
    assert_eq!(f["Handler"], "bootstrap");
    // Both functions run package.sh's zip.
    let package = std::fs::read_to_string(root().join("deploy/package.sh")).unwrap();
    assert!(package.contains(r#"out="$here/build/cloud-bridge-lambda-arm64.zip""#));
    for fun in ["BridgeFunction", "DlqProcessorFunction"] {
        assert_eq!(
            resources(&t)[fun]["Properties"]["CodeUri"],
            "build/cloud-bridge-lambda-arm64.zip",
            "{fun}"
        );
    }

    // The packaged config, as package.sh lays it out, loads and takes the stack's names.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        root().join("deploy/lambda/cloud-bridge.toml"),
        dir.path().join("cloud-bridge.toml"),
    )
    .unwrap();
    std::fs::copy(
        root().join("../config/edge-agent.toml"),
        dir.path().join("edge-agent.toml"),
    )
    .unwrap();
    std::fs::write(dir.path().join("api-keys"), "").unwrap();
    let cfg = cloud_bridge::config::Config::load(&dir.path().join("cloud-bridge.toml"))
        .unwrap()
        .with_env(|k| (k == "CLOUD_BRIDGE_BUCKET").then(|| "stack-bucket".to_string()))
        .unwrap();
    assert_eq!(cfg.aws.bucket, "stack-bucket");
    assert!(cfg.aws.endpoint_url.is_none() && cfg.mqtt.is_none());
    assert!(cfg.verify.is_some() && cfg.ingest.is_some() && cfg.http.is_some());
    cloud_bridge::ingest::auth::Auth::load(cfg.http.as_ref().unwrap()).unwrap();
    for name in ["cloud-bridge.toml", "edge-agent.toml", "api-keys"] {
        assert!(package.contains(name), "package.sh packs {name}");
    }
}

#[test]
fn the_glue_table_reads_the_stored_records() {
    let t = template();
    let table = &resources(&t)["ResultsTable"]["Properties"]["TableInput"];
    let sd = &table["StorageDescriptor"];
    assert_eq!(
        sd["Location"]["Fn::Sub"],
        format!(
            "s3://${{ResultsBucket}}/{}",
            cloud_bridge::layout::events("")
        )
    );
    let p = &table["Parameters"];
    assert_eq!(
        p["storage.location.template"]["Fn::Sub"],
        format!(
            "s3://${{ResultsBucket}}/{}",
            cloud_bridge::layout::events_of_day("", "${!dt}")
        )
    );
    assert_eq!(p["projection.dt.format"], "yyyy-MM-dd");
    assert_eq!(
        table["PartitionKeys"],
        json!([{"Name": "dt", "Type": "string"}])
    );
    // The day format is layout's.
    let day = cloud_bridge::layout::date_of(1_764_064_800_000);
    assert_eq!(day, "2025-11-25");
    // Columns: exactly the fields of a stored record (INTERFACES.md's, with `via`).
    let mut record = proto::EventResult {
        event_id: "d/1".into(),
        device: "d".into(),
        event_type: "meter".into(),
        seq: 1,
        ts: 1,
        gateway: "g".into(),
        via: proto::Via::Gateway,
        edge_seq: 1,
        input: Default::default(),
        result: Default::default(),
        calc_version: "v".into(),
        status: proto::Status::Corrected,
        flags: vec![],
        anomaly_score: 0.0,
        processed_at: 1,
        correction: None,
    };
    record.correction = Some(proto::Correction {
        reason: "r".into(),
        previous_result: Default::default(),
        at: 1,
        by: proto::CorrectedBy::Cloud,
    });
    let v = serde_json::to_value(&record).unwrap();
    let fields: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let columns: BTreeSet<&str> = sd["Columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["Name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, fields);
    let correction = sd["Columns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["Name"] == "correction")
        .unwrap()["Type"]
        .as_str()
        .unwrap()
        .to_string();
    for k in v["correction"].as_object().unwrap().keys() {
        assert!(correction.contains(&format!("{k}:")), "correction.{k}");
    }
}
