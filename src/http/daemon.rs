//! The running daemon's parts that the admin listener reads: one struct shared by the admin
//! API (`http/admin`) and `/metrics` (`http/metrics`), so neither imports the other.

use std::sync::Arc;

use crate::faillog::FailLog;
use crate::guard::Guard;
use crate::intake::Intake;

pub struct Admin {
    pub intake: Arc<Intake>,
    pub faillog: FailLog,
    pub guard: Arc<Guard>,
    /// Webhook endpoints' circuit and disabled state, for operators.
    pub webhook: Arc<crate::deliver::webhook::WebhookCourier>,
    pub events: crate::events::Events,
    /// The SMTP door's counters (connections, evictions, AUTH), for `/metrics`.
    pub smtp: Arc<crate::smtp::server::Server>,
    /// MTA-STS and TLS-RPT: counters for `/metrics`, reports for `ctl tls-report`.
    pub tls_reports: Arc<crate::tls_report::TlsReports>,
    /// Supervised tasks: `/readyz` fails once one has died.
    pub supervisor: crate::supervise::Supervisor,
    pub started: std::time::Instant,
    /// The end-to-end canary: `/readyz` degraded, `/metrics`, `POST /admin/v1/probe`.
    pub canary: Arc<crate::canary::Canary>,
    /// Destinations suspended for being unreachable: `/metrics`, `ctl status`.
    pub suspensions: Arc<crate::scheduler::suspend::Suspensions>,
}
