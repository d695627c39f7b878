//! The strict checks of what a client sends to PostFlowNodeData: an issued, unexpired token on the
//! external URL, `Content-Type: application/json`, a body with exactly the document's fields and types
//! (BizData a *string* holding a JSON object), a known event, no poison BizData. A request is accepted or
//! refused as a whole; an accepted one is kept (`state.rs`).
//!
//! Never: refuses with anything but the document's `{"code":-1,"msg":…}` (or its 401 page for a token).

use std::time::SystemTime;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;

use super::lock;
use super::replies::{html, json, reject};
use super::state::{Shared, WorkOrder};

impl Shared {
    /// Token, Content-Type and body checks; keeps the orders of a valid request.
    pub(super) async fn check_and_apply(
        &self,
        request: u64,
        external: bool,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Response {
        if external && !self.token_valid(headers) {
            return self.unauthorized();
        }
        let is_json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("application/json"));
        if !is_json {
            return reject("Content-Type 必须是 application/json");
        }
        let orders = match parse_flow_node_data(body, request, external) {
            Ok(o) => o,
            Err(msg) => return reject(&msg),
        };
        let event = orders.first().map(|o| o.event_name.clone()).unwrap_or_default();
        if !self.opts.events.contains(&event) || lock(&self.unknown_events).contains(&event) {
            return reject(&format!("事件【{event}】不存在"));
        }
        if let Some(bad) = self
            .opts
            .reject_biz
            .iter()
            .find(|bad| orders.iter().any(|o| o.biz_data.contains(bad.as_str())))
        {
            return reject(&format!("业务数据不合法：{bad}"));
        }
        if let Err(e) = self.keep(&orders).await {
            tracing::error!(message = "Mock Panda cannot write its JSON-lines file.", error = %e);
            return html(StatusCode::INTERNAL_SERVER_ERROR, "500 Internal Server Error");
        }
        json(serde_json::json!({"code": 0, "msg": ""}))
    }

    fn token_valid(&self, headers: &HeaderMap) -> bool {
        let Some(token) = headers.get("panda-token").and_then(|v| v.to_str().ok()) else {
            return false;
        };
        lock(&self.tokens)
            .get(token)
            .is_some_and(|exp| *exp > SystemTime::now())
    }
}

/// Check a PostFlowNodeData body strictly; the orders it carries, or the `msg` to refuse it with.
fn parse_flow_node_data(body: &[u8], request: u64, external: bool) -> Result<Vec<WorkOrder>, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("请求体不是合法的 JSON: {e}"))?;
    let obj = v.as_object().ok_or("请求体必须是 JSON 对象")?;
    if let Some(k) = obj
        .keys()
        .find(|k| !["eventName", "userId", "FlowDatas"].contains(&k.as_str()))
    {
        return Err(format!("未知字段【{k}】"));
    }
    let event_name = obj
        .get("eventName")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .ok_or("eventName 必填，且必须是字符串")?;
    let user_id = obj
        .get("userId")
        .and_then(|v| v.as_i64())
        .ok_or("userId 必填，且必须是整数")?;
    let datas = obj
        .get("FlowDatas")
        .and_then(|v| v.as_array())
        .filter(|a| !a.is_empty())
        .ok_or("FlowDatas 必填，且必须是非空数组")?;
    let mut orders = Vec::with_capacity(datas.len());
    for (i, d) in datas.iter().enumerate() {
        let d = d.as_object().ok_or(format!("FlowDatas[{i}] 必须是对象"))?;
        if let Some(k) = d
            .keys()
            .find(|k| !["toUserIds", "opinion", "BizData"].contains(&k.as_str()))
        {
            return Err(format!("FlowDatas[{i}] 未知字段【{k}】"));
        }
        let optional = |k: &str| match d.get(k) {
            None => Ok(String::new()),
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(format!("FlowDatas[{i}].{k} 必须是字符串")),
        };
        let to_user_ids = optional("toUserIds")?;
        let opinion = optional("opinion")?;
        let biz_data = d.get("BizData").and_then(|v| v.as_str()).ok_or(format!(
            "FlowDatas[{i}].BizData 必填，且必须是字符串（序列化后的 JSON 对象）"
        ))?;
        let biz = match serde_json::from_str::<serde_json::Value>(biz_data) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => return Err(format!("FlowDatas[{i}].BizData 不是 JSON 对象字符串")),
        };
        orders.push(WorkOrder {
            request,
            event_name: event_name.to_string(),
            user_id,
            to_user_ids,
            opinion,
            biz_data: biz_data.to_string(),
            biz,
            external,
        });
    }
    Ok(orders)
}

/// Whether a request body, or one of its BizData strings, contains `text` (a firewall sees the raw body;
/// a text with quotes appears escaped there).
pub(super) fn body_contains(body: &[u8], text: &str) -> bool {
    if text.is_empty() {
        return false;
    }
    if String::from_utf8_lossy(body).contains(text) {
        return true;
    }
    parse_flow_node_data(body, 0, false).is_ok_and(|orders| orders.iter().any(|o| o.biz_data.contains(text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_firewall_rule_matches_the_raw_body_or_a_bizdata() {
        let body = r#"{"eventName":"e","userId":42,"FlowDatas":[{"BizData":"{\"序号\":\"17\"}"}]}"#;
        assert!(body_contains(body.as_bytes(), r#""序号":"17""#), "inside BizData");
        assert!(body_contains(body.as_bytes(), "userId"), "raw body");
        assert!(!body_contains(body.as_bytes(), r#""序号":"18""#));
        assert!(!body_contains(body.as_bytes(), ""));
    }

    #[test]
    fn bodies_are_checked_strictly() {
        let ok =
            r#"{"eventName":"e","userId":42,"FlowDatas":[{"toUserIds":"","opinion":"","BizData":"{\"a\":\"1\"}"}]}"#;
        let orders = parse_flow_node_data(ok.as_bytes(), 1, true).unwrap();
        assert_eq!(orders[0].biz_data, r#"{"a":"1"}"#);
        assert_eq!(orders[0].biz.get("a").unwrap(), "1");
        for bad in [
            "",
            "[]",
            r#"{"eventName":"e","userId":"42","FlowDatas":[{"BizData":"{}"}]}"#,
            r#"{"eventName":"e","userId":42.5,"FlowDatas":[{"BizData":"{}"}]}"#,
            r#"{"eventName":1,"userId":42,"FlowDatas":[{"BizData":"{}"}]}"#,
            r#"{"eventName":"e","userId":42,"FlowDatas":[]}"#,
            r#"{"eventName":"e","userId":42,"FlowDatas":[{"BizData":{"a":"1"}}]}"#,
            r#"{"eventName":"e","userId":42,"FlowDatas":[{"BizData":"[1]"}]}"#,
            r#"{"eventName":"e","userId":42,"FlowDatas":[{"BizData":"{}","extra":""}]}"#,
            r#"{"eventName":"e","userId":42,"FlowDatas":[{"BizData":"{}"}],"meterNo":"M1"}"#,
            r#"{"eventName":"e","userId":42,"FlowDatas":[{"BizData":"{}","opinion":1}]}"#,
        ] {
            assert!(parse_flow_node_data(bad.as_bytes(), 1, true).is_err(), "{bad}");
        }
    }
}
