//! Shutdown: one signal every listener and background task shares. Triggered once (SIGTERM, SIGINT, or a
//! test), observed by anyone holding a [`Shutdown`].

use tokio::sync::watch;

/// Fires the shutdown signal.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Waits for the shutdown signal; cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Resolves once shutdown is triggered (at once if it already was, or if the trigger is gone).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|fired| *fired).await;
    }

    pub fn is_fired(&self) -> bool {
        *self.0.borrow()
    }
}
