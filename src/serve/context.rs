//! The handles the request path may touch, built once by `app` and shared by every connection.
//!
//! The path only *loads* the routing table and the budget: it never decides a rollback nor swaps a
//! table. Everything it writes goes to the arm's windows (through the table's arms), the Prometheus
//! handles, the evaluation queue and the tracer.

use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::eval::Pipeline;
use crate::guards::budget::Budget;
use crate::guards::fence::Fence;
use crate::serve::router::RoutingTable;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::otel::Otel;

/// The live routing table, shared with its one writer (`rollback::control`); readers only load it.
pub type TableCell = Arc<ArcSwap<RoutingTable>>;

/// The live token budget, rebuilt by a reload that changes its backend.
pub type BudgetCell = Arc<ArcSwapOption<Budget>>;

/// What one request may use, in the order the stages need it.
pub struct Context {
    table: TableCell,
    budget: BudgetCell,
    /// The idempotency fence, when the config names write routes.
    pub fence: Option<Arc<Fence>>,
    /// The evaluation queue the tee hands sampled exchanges to.
    pub eval: Arc<Pipeline>,
    /// OpenTelemetry tracing, when configured; `None` costs one check per request.
    pub tracer: Option<Arc<Otel>>,
    pub metrics: Arc<Metrics>,
}

impl Context {
    pub fn new(
        table: TableCell,
        budget: BudgetCell,
        fence: Option<Arc<Fence>>,
        eval: Arc<Pipeline>,
        tracer: Option<Arc<Otel>>,
        metrics: Arc<Metrics>,
    ) -> Context {
        Context {
            table,
            budget,
            fence,
            eval,
            tracer,
            metrics,
        }
    }

    /// The routing table as it is now; a request keeps the one it started with.
    pub fn table(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// The global token budget, when the config has a `[budget]`.
    pub fn budget(&self) -> Option<Arc<Budget>> {
        self.budget.load_full()
    }
}
