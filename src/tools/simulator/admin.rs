//! The admin HTTP API of `fieldgate simulate` (`--admin ADDR`): list the units, flip, fault, silence or
//! wake one, script its battery and flow, make it flaky. Each change is printed, as a stdin command's is.
//!
//! Never: answers for a unit that is not simulated (404) or takes a malformed number (400).

use super::command::{flaky, hundredths, valve_word};
use super::{Plant, UnitStatus, VALVE_FAULT};

pub(super) fn admin_router(plant: Plant) -> axum::Router {
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use axum::routing::{get, post};
    use axum::Json;

    type Reply = (StatusCode, Json<serde_json::Value>);

    fn unknown(unit: u8) -> Reply {
        (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": format!("no unit {unit}") })),
        )
    }

    async fn units(State(plant): State<Plant>) -> Json<Vec<UnitStatus>> {
        Json(plant.status())
    }

    async fn flip(State(plant): State<Plant>, Path(unit): Path<u8>) -> Reply {
        match plant.flip_valve(unit) {
            Some(open) => {
                println!("unit {unit}: valve {} (admin API)", valve_word(open));
                (
                    StatusCode::OK,
                    Json(serde_json::json!({ "unit": unit, "valve_open": open })),
                )
            }
            None => unknown(unit),
        }
    }

    async fn set_silent(plant: Plant, unit: u8, silent: bool) -> Reply {
        if plant.unit(unit).is_none() {
            return unknown(unit);
        }
        plant.silence(unit, silent);
        println!(
            "unit {unit}: {} (admin API)",
            if silent { "silenced" } else { "answering again" }
        );
        (
            StatusCode::OK,
            Json(serde_json::json!({ "unit": unit, "silenced": silent })),
        )
    }

    async fn fault(State(plant): State<Plant>, Path(unit): Path<u8>) -> Reply {
        if !plant.fault_valve(unit) {
            return unknown(unit);
        }
        println!("unit {unit}: valve reports 故障 (admin API)");
        (
            StatusCode::OK,
            Json(serde_json::json!({ "unit": unit, "valve_status": VALVE_FAULT })),
        )
    }

    fn bad(what: &str) -> Reply {
        (StatusCode::BAD_REQUEST, Json(serde_json::json!({ "error": what })))
    }

    async fn battery(State(plant): State<Plant>, Path((unit, volts)): Path<(u8, String)>) -> Reply {
        let Some(raw) = hundredths(&volts).and_then(|r| u16::try_from(r).ok()) else {
            return bad("volts must be a number 0..655.35, e.g. 3.2");
        };
        if !plant.set_battery(unit, raw) {
            return unknown(unit);
        }
        println!("unit {unit}: 电池电压 {}.{:02} V (admin API)", raw / 100, raw % 100);
        (
            StatusCode::OK,
            Json(serde_json::json!({ "unit": unit, "battery_raw": raw })),
        )
    }

    async fn flow(State(plant): State<Plant>, Path((unit, m3)): Path<(u8, String)>) -> Reply {
        let Some(raw) = hundredths(&m3).and_then(|r| u32::try_from(r).ok()) else {
            return bad("m3 must be a positive number, e.g. 0.05");
        };
        match plant.add_flow(unit, raw) {
            Some(flow) => {
                println!("unit {unit}: 累计流量 +{m3} m³, valve not moved (admin API)");
                (
                    StatusCode::OK,
                    Json(serde_json::json!({ "unit": unit, "flow_raw": flow })),
                )
            }
            None => unknown(unit),
        }
    }

    #[derive(serde::Deserialize)]
    struct FlakyQuery {
        late_ms: Option<u64>,
        seed: Option<u64>,
    }

    async fn set_flaky(
        State(plant): State<Plant>,
        Path((unit, percent)): Path<(u8, String)>,
        axum::extract::Query(q): axum::extract::Query<FlakyQuery>,
    ) -> Reply {
        let Some(pct) = percent.parse::<f64>().ok().filter(|p| (0.0..=100.0).contains(p)) else {
            return bad("percent must be a number 0..100, e.g. 25");
        };
        if plant.unit(unit).is_none() {
            return unknown(unit);
        }
        let seed = q.seed.unwrap_or_else(rand::random);
        let late_ms = q.late_ms.unwrap_or(1000);
        plant.set_flaky(unit, (pct > 0.0).then(|| flaky(pct, late_ms, seed)));
        println!("unit {unit}: flaky {pct} %, late {late_ms} ms, seed {seed} (admin API)");
        (
            StatusCode::OK,
            Json(serde_json::json!({ "unit": unit, "flaky_percent": pct, "late_ms": late_ms, "seed": seed })),
        )
    }

    axum::Router::new()
        .route("/units", get(units))
        .route("/units/{unit}/flaky/{percent}", post(set_flaky))
        .route("/units/{unit}/flip", post(flip))
        .route("/units/{unit}/fault", post(fault))
        .route("/units/{unit}/battery/{volts}", post(battery))
        .route("/units/{unit}/flow/{m3}", post(flow))
        .route(
            "/units/{unit}/silence",
            post(|State(p): State<Plant>, Path(u): Path<u8>| set_silent(p, u, true)),
        )
        .route(
            "/units/{unit}/wake",
            post(|State(p): State<Plant>, Path(u): Path<u8>| set_silent(p, u, false)),
        )
        .with_state(plant)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn the_admin_api_flips_silences_scripts_and_lists_units() {
        let plant = Plant::with_meters(2);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("bound");
        let app = admin_router(plant.clone());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::new();
        let post = |path: &str| http.post(format!("http://{addr}{path}")).send();
        assert_eq!(post("/units/1/flip").await.expect("flip").status(), 200);
        assert_eq!(plant.valve(1), Some(true));
        assert_eq!(post("/units/2/silence").await.expect("silence").status(), 200);
        assert_eq!(post("/units/9/flip").await.expect("flip 9").status(), 404);
        assert_eq!(post("/units/x/flip").await.expect("flip x").status(), 400);
        let units: serde_json::Value = http
            .get(format!("http://{addr}/units"))
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("json");
        assert_eq!(units[0]["valve_open"], true);
        assert_eq!(units[1]["silenced"], true);
        assert_eq!(post("/units/2/wake").await.expect("wake").status(), 200);
        assert!(!plant.status()[1].silenced);
        assert_eq!(post("/units/1/fault").await.expect("fault").status(), 200);
        assert_eq!(plant.status()[0].valve_status, VALVE_FAULT);
        assert_eq!(post("/units/2/battery/3.2").await.expect("battery").status(), 200);
        assert_eq!(plant.holding(2, 2), Some(320));
        assert_eq!(post("/units/2/battery/abc").await.expect("battery").status(), 400);
        let before = plant.flow(2).unwrap_or_default();
        assert_eq!(post("/units/2/flow/0.05").await.expect("flow").status(), 200);
        assert_eq!(plant.flow(2), Some(before + 5));
        assert_eq!(post("/units/9/fault").await.expect("fault 9").status(), 404);
        assert_eq!(
            post("/units/1/flaky/25?late_ms=100&seed=3")
                .await
                .expect("flaky")
                .status(),
            200
        );
        assert_eq!(plant.status()[0].flaky_percent, 25.0);
        assert_eq!(post("/units/1/flaky/abc").await.expect("flaky abc").status(), 400);
        assert_eq!(post("/units/1/flaky/0").await.expect("flaky off").status(), 200);
        assert_eq!(plant.status()[0].flaky_percent, 0.0);
        server.abort();
    }
}
