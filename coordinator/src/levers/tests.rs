use cutover_common::levers::{MaintenanceSettings, PauseSettings, ThrottleSettings};

use super::*;

fn record(node: &str, settings: LeverSettings) -> LeverRecord {
    let kind = match (&settings.maintenance, &settings.throttle) {
        (Some(_), _) => LeverKind::Maintenance,
        (_, Some(_)) => LeverKind::Throttle,
        _ => LeverKind::Pause,
    };
    LeverRecord {
        env: "production".into(),
        service: "web".into(),
        node: node.into(),
        kind,
        settings,
        by: "alice".into(),
        at_ms: 1,
    }
}

fn maintenance(message: &str) -> LeverSettings {
    LeverSettings {
        maintenance: Some(MaintenanceSettings {
            message: message.into(),
            retry_after_s: 120,
            allow: Vec::new(),
            bypass_secret: String::new(),
        }),
        ..Default::default()
    }
}

fn throttle(rps: u32) -> LeverSettings {
    LeverSettings {
        throttle: Some(ThrottleSettings {
            rps,
            burst: rps,
            per: "client-ip".into(),
            path_prefix: "/checkout".into(),
        }),
        ..Default::default()
    }
}

#[test]
fn a_nodes_own_lever_wins_over_the_environments_of_the_same_kind_only() {
    let records = [
        record("", maintenance("everyone")),
        record("web-2", maintenance("web-2 only")),
        record("", throttle(100)),
        record(
            "web-3",
            LeverSettings {
                pause: Some(PauseSettings {
                    max_pause_ms: 30_000,
                    since_ms: 5,
                }),
                ..Default::default()
            },
        ),
    ];
    let web1 = effective(&records, "web-1");
    assert_eq!(web1.maintenance.unwrap().message, "everyone");
    assert_eq!(web1.throttle.unwrap().rps, 100);
    assert_eq!(web1.pause, None);
    let web2 = effective(&records, "web-2");
    assert_eq!(web2.maintenance.unwrap().message, "web-2 only");
    assert_eq!(
        web2.throttle.unwrap().rps,
        100,
        "its own maintenance keeps the throttle"
    );
    assert_eq!(
        effective(&records, "web-3").pause.unwrap().max_pause_ms,
        30_000
    );
    assert!(effective(&[], "web-1").is_empty());
}

#[test]
fn levers_read_as_one_line() {
    let mut settings = maintenance("Back at 04:00");
    settings.throttle = throttle(50).throttle;
    assert_eq!(
        describe(&settings),
        "503 \"Back at 04:00\", retry after 120s; 50 rps (burst 50) per client-ip on /checkout*"
    );
}
