//! `fieldgate mock-panda`: run the mock Panda with the options of the command line (faults once or at
//! random, the odd answers of a proxy in front of it), printing each accepted order, until Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;

use super::{Fault, FaultKind, MockOptions, MockPanda};

/// `fieldgate mock-panda`: run the mock until Ctrl-C.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct MockPandaArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Lifetime of issued tokens, e.g. "1h", "90s".
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    token_ttl: Duration,
    /// Known eventNames, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "用水户开阀,用水户关阀")]
    events: Vec<String>,
    /// Append every accepted order to this file as a JSON line.
    #[arg(long)]
    jsonl: Option<PathBuf>,
    /// GenerateToken username accepted.
    #[arg(long, default_value = "0CYKwAUCTLZ4KW6l")]
    username: String,
    /// GenerateToken password accepted.
    #[arg(long, default_value = "1vOkb5Ps4XfitL6G")]
    password: String,
    /// The {projectName} path segment.
    #[arg(long, default_value = "demo")]
    project: String,
    /// Probability (0..=1) that a PostFlowNodeData meets a random fault from --fault (default 500).
    #[arg(long, value_parser = parse_rate)]
    fail_rate: Option<f64>,
    /// Fault kinds: 500, html, truncate, reset, slow, reject, 408, 429, 503 (with --retry-after), 413, 403,
    /// 301 (to --redirect-to) (repeatable or comma list). With --fail-rate they are drawn at random;
    /// without it each is used once, in order, by the first requests.
    #[arg(long = "fault", value_enum, value_delimiter = ',')]
    faults: Vec<FaultKind>,
    /// How late a `slow` fault answers (the request is applied; a client with a shorter timeout loses
    /// the answer).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    slow_delay: Duration,
    /// An event to refuse with 事件【NAME】不存在 (repeatable), even if it is in --events.
    #[arg(long = "unknown-event")]
    unknown_events: Vec<String>,
    /// Refuse any request whose BizData contains this text (repeatable): a poison record.
    #[arg(long = "reject-biz")]
    reject_biz: Vec<String>,
    /// Refuse the first N logins with errMsg 密码错误 (more: `POST /_mock/fail-next-login`).
    #[arg(long, default_value_t = 0)]
    fail_logins: u64,
    /// The odd HTTP answers of a proxy in front of Panda (boxed: they would make every `fieldgate`
    /// command's arguments larger).
    #[command(flatten)]
    answers: Box<AnswerArgs>,
}

/// `fieldgate mock-panda`: the odd HTTP answers (busy, redirect, a proxy's body limit or firewall).
#[derive(Debug, Clone, clap::Args)]
struct AnswerArgs {
    /// `Retry-After` (whole seconds, e.g. "30s") sent with the 408, 429 and 503 faults; none by default.
    #[arg(long, value_parser = humantime::parse_duration)]
    retry_after: Option<Duration>,
    /// `Location` of the 301 fault; default: the request's URL with https://.
    #[arg(long)]
    redirect_to: Option<String>,
    /// Answer 413 with nginx's page to any PostFlowNodeData with a longer body (bytes): nginx's
    /// client_max_body_size, 1048576 by default in nginx.
    #[arg(long)]
    max_body: Option<usize>,
    /// STATUS:TEXT: answer STATUS (e.g. 413, 403) with an nginx-style page to any PostFlowNodeData whose
    /// body or a BizData in it contains TEXT (repeatable): a firewall or proxy that refuses one record.
    #[arg(long = "status-biz", value_parser = parse_status_biz)]
    status_biz: Vec<(u16, String)>,
}

fn parse_status_biz(s: &str) -> Result<(u16, String), String> {
    let (status, text) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}`: use STATUS:TEXT, e.g. 413:M13"))?;
    let status = status
        .trim()
        .parse::<u16>()
        .ok()
        .filter(|c| (400..=599).contains(c))
        .ok_or_else(|| format!("`{s}`: STATUS must be an HTTP error status from 400 to 599"))?;
    if text.is_empty() {
        return Err(format!("`{s}`: TEXT must not be empty"));
    }
    Ok((status, text.to_string()))
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "`{s}` is not a probability: use a number from 0 to 1, e.g. 0.2"
        )),
    }
}

/// Run the mock with `args`, printing each accepted order, until Ctrl-C.
pub(crate) async fn mock_panda_main(args: MockPandaArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let opts = MockOptions {
        username: args.username,
        password: args.password,
        project: args.project,
        token_ttl: args.token_ttl,
        events: args
            .events
            .into_iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect(),
        jsonl: args.jsonl,
        print: true,
        unknown_events: args.unknown_events,
        reject_biz: args.reject_biz,
        fail_rate: args.fail_rate.unwrap_or(0.0),
        fault_kinds: args.faults.clone(),
        slow_delay: args.slow_delay,
        retry_after: args.answers.retry_after,
        redirect_to: args.answers.redirect_to,
        max_body: args.answers.max_body,
        status_biz: args.answers.status_biz,
    };
    println!(
        "Mock Panda on http://{}  project={}  username={}  token_ttl={}  events={}",
        listener.local_addr().unwrap_or(args.listen),
        opts.project,
        opts.username,
        humantime::format_duration(opts.token_ttl),
        opts.events.join(",")
    );
    if let Some(p) = &opts.jsonl {
        println!("Appending accepted orders to {}", p.display());
    }
    if opts.fail_rate > 0.0 {
        println!(
            "Faults: {:.0}% of requests, drawn from {:?}",
            opts.fail_rate * 100.0,
            if opts.fault_kinds.is_empty() {
                vec![FaultKind::Status500]
            } else {
                opts.fault_kinds.clone()
            }
        );
    }
    let once = if args.fail_rate.is_none() {
        args.faults
    } else {
        Vec::new()
    };
    let faults: Vec<Fault> = once.into_iter().map(|k| k.fault_with(&opts)).collect();
    let mock = MockPanda::start(listener, opts);
    for fault in faults {
        mock.push_fault(fault);
    }
    if args.fail_logins > 0 {
        mock.fail_next_logins(args.fail_logins);
    }
    println!(
        "Control: POST /_mock/fail-next-login, POST /_mock/fault/{{kind}}, POST /_mock/revoke-tokens, GET /_mock/stats"
    );
    tokio::signal::ctrl_c().await?;
    println!(
        "Stopping: {} orders accepted, {} tokens issued.",
        mock.orders().len(),
        mock.logins()
    );
    mock.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::mock_panda::RetryAfter;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: MockPandaArgs,
    }

    #[test]
    fn mock_args_default_and_parse() {
        let a = Cli::try_parse_from(["x"]).unwrap().args;
        assert_eq!(a.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(a.token_ttl, Duration::from_secs(3600));
        assert_eq!(a.events, vec!["用水户开阀", "用水户关阀"]);
        let a = Cli::try_parse_from(["x", "--events", "a,b,c", "--token-ttl", "90s"])
            .unwrap()
            .args;
        assert_eq!(a.events, vec!["a", "b", "c"]);
        assert_eq!(a.token_ttl, Duration::from_secs(90));
        let a = Cli::try_parse_from([
            "x",
            "--fail-rate",
            "0.25",
            "--fault",
            "500,html",
            "--fault",
            "truncate",
            "--fault",
            "reset,slow,reject",
            "--unknown-event",
            "用水户开阀",
            "--unknown-event",
            "B",
            "--reject-biz",
            "M13",
        ])
        .unwrap()
        .args;
        assert_eq!(a.fail_rate, Some(0.25));
        assert_eq!(
            a.faults,
            vec![
                FaultKind::Status500,
                FaultKind::Html,
                FaultKind::Truncate,
                FaultKind::Reset,
                FaultKind::Slow,
                FaultKind::Reject
            ]
        );
        assert_eq!(a.unknown_events, vec!["用水户开阀", "B"]);
        assert_eq!(a.reject_biz, vec!["M13"]);
        assert!(Cli::try_parse_from(["x", "--fail-rate", "1.5"]).is_err());
        assert!(Cli::try_parse_from(["x", "--fault", "explode"]).is_err());
        assert_eq!(FaultKind::parse("RESET"), Some(FaultKind::Reset));
        assert_eq!(FaultKind::parse("500"), Some(FaultKind::Status500));
    }

    #[test]
    fn the_odd_answers_parse_from_the_command_line() {
        let a = Cli::try_parse_from([
            "x",
            "--fault",
            "408,429,503,413,403,301",
            "--retry-after",
            "30s",
            "--redirect-to",
            "https://panda.example/",
            "--max-body",
            "1048576",
            "--status-biz",
            "413:M13",
            "--status-biz",
            "403:<script>",
        ])
        .unwrap()
        .args;
        assert_eq!(
            a.faults,
            vec![
                FaultKind::Status408,
                FaultKind::Status429,
                FaultKind::Status503,
                FaultKind::Status413,
                FaultKind::Status403,
                FaultKind::Redirect301
            ]
        );
        let answers = &a.answers;
        assert_eq!(answers.retry_after, Some(Duration::from_secs(30)));
        assert_eq!(answers.max_body, Some(1_048_576));
        assert_eq!(
            answers.status_biz,
            vec![(413, "M13".to_string()), (403, "<script>".to_string())]
        );
        let opts = MockOptions {
            retry_after: answers.retry_after,
            redirect_to: answers.redirect_to.clone(),
            ..MockOptions::default()
        };
        assert_eq!(
            FaultKind::Status429.fault_with(&opts),
            Fault::Busy {
                status: 429,
                retry_after: Some(RetryAfter::Seconds(30))
            }
        );
        assert_eq!(
            FaultKind::Redirect301.fault_with(&opts),
            Fault::Redirect {
                status: 301,
                location: Some("https://panda.example/".into())
            }
        );
        assert_eq!(FaultKind::Status413.fault_with(&opts), Fault::Status(413));
        for bad in ["413", "99:x", "413:", "abc:x"] {
            assert!(Cli::try_parse_from(["x", "--status-biz", bad]).is_err(), "{bad}");
        }
    }
}
