//! Closes a payer forces on chain, a close racing a higher voucher, and pending credits that
//! cannot apply: every credit stays backed by money we hold or can still collect. Real Redis,
//! the project's test chain (no real money), channels opened by the real mppx client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use alloy::primitives::B256;
use async_trait::async_trait;
use common::*;
use tollgate_payments::channels::{PendingCredit, Updater};
use tollgate_payments::{
    ChainError, ChannelBackend, ChannelRecord, Lifecycle, OnChain, Payments, PoisonedCredit,
    RedisChannels, RpcChain,
};

/// Opens a $5 channel with the real client ($1 voucher), then raises it to `cumulative` with
/// vouchers signed here. Returns the channel id.
async fn channel_at(rig: &Rig, cumulative: u128) -> (String, B256) {
    let (id, ch) = open_channel(rig).await;
    let p = &rig.nodes[0].payments;
    let record = p.backend().get(&id).await.unwrap().unwrap();
    remember(&id, record.descriptor);
    if cumulative > 1_000_000 {
        let escrow = rig.config().escrow;
        p.accept(&voucher(
            p,
            &id,
            cumulative,
            sign(PAYER_KEY, ch, cumulative, escrow),
        ))
        .await
        .unwrap();
    }
    (id, ch)
}

async fn record(rig: &Rig, id: &str) -> ChannelRecord {
    rig.nodes[0]
        .payments
        .backend()
        .get(id)
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_requested_on_chain_is_captured_in_full_before_the_payer_can_withdraw() {
    let rig = Rig::start(1).await;
    rig.fund(PAYER_KEY);
    let payee = address(PAYEE_KEY);
    let payee_before = rig.token_balance(payee);
    let acct = account(PAYER_KEY);
    // The whole $5 deposit in vouchers: $5 of credit.
    let (id, ch) = channel_at(&rig, 5_000_000).await;
    assert_eq!(rig.available(&acct).await, 5 * USD);
    let payer_after_open = rig.token_balance(address(PAYER_KEY));

    // The attack: request a close on chain, wait out the grace period, withdraw everything.
    assert!(rig.request_close(PAYER_KEY, &id).await);
    let p = &rig.nodes[0].payments;
    // The next settlement round sees the request and captures the highest voucher in full.
    p.settle_now().await.unwrap();
    let on_chain = rig.chain.chain().channel(ch).unwrap();
    assert_eq!(on_chain.settled, 5_000_000, "the voucher was not captured");
    assert_eq!(rig.token_balance(payee), payee_before + 5_000_000);
    let r = record(&rig, &id).await;
    assert_eq!(r.lifecycle(), Lifecycle::Captured);
    assert_eq!(p.metrics.close_requests.get(), 1);
    // No voucher is accepted on a channel closing on chain.
    let escrow = rig.config().escrow;
    assert!(
        p.accept(&voucher(
            p,
            &id,
            5_000_000,
            sign(PAYER_KEY, ch, 5_000_000, escrow)
        ))
        .await
        .is_err()
    );
    // The payer withdraws after the grace period: nothing is left to take.
    rig.increase_time(901).await;
    assert!(rig.withdraw(PAYER_KEY, &id).await);
    assert_eq!(rig.token_balance(address(PAYER_KEY)), payer_after_open);
    p.settle_now().await.unwrap();
    assert_eq!(record(&rig, &id).await.lifecycle(), Lifecycle::Closed);
    // The account keeps its $5: money we hold.
    assert_eq!(rig.available(&acct).await, 5 * USD);
    assert_eq!(p.metrics.write_offs.get(), 0);
    assert_eq!(rig.audit().await, vec![], "audit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voucher_sent_after_a_close_request_is_refused_and_hands_the_channel_to_the_watcher() {
    let rig = Rig::start(1).await;
    rig.fund(PAYER_KEY);
    let (id, ch) = channel_at(&rig, 2_000_000).await;
    assert!(rig.request_close(PAYER_KEY, &id).await);
    let p = &rig.nodes[0].payments;
    let escrow = rig.config().escrow;
    let e = p
        .accept(&voucher(
            p,
            &id,
            3_000_000,
            sign(PAYER_KEY, ch, 3_000_000, escrow),
        ))
        .await
        .unwrap_err();
    assert!(!e.retryable, "{e:?}");
    // Known from the accept alone, before any scan of the chain's events.
    let r = record(&rig, &id).await;
    assert!(r.state.closing);
    assert_eq!(r.lifecycle(), Lifecycle::CloseRequested);
    assert_eq!(rig.available(&account(PAYER_KEY)).await, 2 * USD);
    p.watch_closes().await.unwrap();
    assert_eq!(rig.chain.chain().channel(ch).unwrap().settled, 2_000_000);
    assert_eq!(record(&rig, &id).await.lifecycle(), Lifecycle::Captured);
    assert_eq!(rig.audit().await, vec![]);
}

/// The chain, with faults switched on and off: settlements that fail (`broken`) or land with
/// their answer lost (`lose_answer`), reads from a node that lags behind a close request
/// (`stale_reads`), event scans that see nothing (`hide_events`; a lookup by channel still
/// works), and a node that refuses event ranges over `max_range` blocks.
#[derive(Default)]
struct Faulty {
    inner: Option<RpcChain>,
    broken: AtomicBool,
    lose_answer: AtomicBool,
    stale_reads: AtomicBool,
    hide_events: AtomicBool,
    max_range: AtomicU64,
    refused: AtomicU64,
    /// `latest_block` calls: one per scan.
    heads: AtomicU64,
    /// Hold a settlement's answer (after it landed) until `release` is notified.
    hold_answer: AtomicBool,
    landed: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

impl Faulty {
    fn inner(&self) -> &RpcChain {
        self.inner.as_ref().unwrap()
    }
}

#[async_trait]
impl tollgate_payments::Chain for Faulty {
    async fn channel(&self, id: B256) -> Result<OnChain, ChainError> {
        let mut oc = self.inner().channel(id).await?;
        if self.stale_reads.load(Ordering::Acquire) {
            oc.close_requested_at = 0;
        }
        Ok(oc)
    }
    async fn now(&self) -> Result<u64, ChainError> {
        self.inner().now().await
    }
    async fn latest_block(&self) -> Result<u64, ChainError> {
        self.heads.fetch_add(1, Ordering::AcqRel);
        self.inner().latest_block().await
    }
    async fn channel_events(
        &self,
        from: u64,
        to: u64,
        channel: Option<B256>,
    ) -> Result<Vec<tollgate_payments::ChannelEvent>, ChainError> {
        let cap = self.max_range.load(Ordering::Acquire);
        if cap > 0 && to - from + 1 > cap {
            self.refused.fetch_add(1, Ordering::AcqRel);
            return Err(ChainError::Refused(format!(
                "query exceeds max block range {cap} (test)"
            )));
        }
        if channel.is_none() && self.hide_events.load(Ordering::Acquire) {
            return Ok(Vec::new());
        }
        self.inner().channel_events(from, to, channel).await
    }
    async fn settle(
        &self,
        d: &mpp::protocol::methods::tempo::session::ChannelDescriptor,
        cumulative: u128,
        sig: &[u8],
    ) -> Result<B256, ChainError> {
        if self.broken.load(Ordering::Acquire) {
            return Err(ChainError::Unavailable("connection refused (test)".into()));
        }
        let r = self.inner().settle(d, cumulative, sig).await;
        if self.hold_answer.load(Ordering::Acquire) {
            self.landed.notify_one();
            self.release.notified().await;
        }
        if self.lose_answer.load(Ordering::Acquire) {
            return Err(ChainError::Unavailable("answer lost (test)".into()));
        }
        r
    }
    async fn close(
        &self,
        d: &mpp::protocol::methods::tempo::session::ChannelDescriptor,
        cumulative: u128,
        capture: u128,
        sig: &[u8],
    ) -> Result<B256, ChainError> {
        self.inner().close(d, cumulative, capture, sig).await
    }
}

/// A payments node over the rig's stores whose settlements fail until `broken` is cleared.
async fn flaky_node(rig: &Rig) -> (Payments, Arc<Faulty>) {
    let backend = Arc::new(
        RedisChannels::connect(rig.redis.target(), "tollgate")
            .await
            .unwrap(),
    );
    faulty_node(rig, backend).await
}

async fn faulty_node(rig: &Rig, backend: Arc<dyn ChannelBackend>) -> (Payments, Arc<Faulty>) {
    let cfg = rig.config();
    let chain = Arc::new(Faulty {
        inner: Some(
            RpcChain::new(
                &rig.chain.url(),
                PAYEE_KEY.parse().unwrap(),
                cfg.chain_id,
                cfg.escrow,
            )
            .unwrap(),
        ),
        broken: AtomicBool::new(true),
        ..Faulty::default()
    });
    let p = Payments::new(
        cfg,
        backend,
        Arc::new(mpp::MemoryStore::new()),
        rig.money.clone(),
        chain.clone(),
    )
    .unwrap();
    (p, chain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voucher_not_captured_before_the_payer_can_withdraw_is_written_off_once() {
    let rig = Rig::start(1).await;
    rig.fund(PAYER_KEY);
    let acct = account(PAYER_KEY);
    let (id, ch) = channel_at(&rig, 3_000_000).await;
    // $1 of the $3 is spent.
    rig.money.charge(&acct, "spend", USD, false).await.unwrap();
    assert!(rig.request_close(PAYER_KEY, &id).await);
    let (p, chain) = flaky_node(&rig).await;
    // Early in the grace period the capture fails: nothing is written off yet.
    p.settle_now().await.unwrap();
    assert_eq!(
        record(&rig, &id).await.lifecycle(),
        Lifecycle::CloseRequested
    );
    assert_eq!(rig.available(&acct).await, 2 * USD);
    assert_eq!(p.metrics.write_offs.get(), 0);
    // Still failing when the payer is about to be able to withdraw: the $2 left of the credit
    // the voucher backed goes (the $1 spent is revenue lost, not credit kept).
    rig.increase_time(880).await;
    p.settle_now().await.unwrap();
    assert_eq!(rig.available(&acct).await, 0);
    let r = record(&rig, &id).await;
    assert_eq!(r.lifecycle(), Lifecycle::WrittenOff);
    assert_eq!(r.forced_close.as_ref().unwrap().written_off, Some(2 * USD));
    assert_eq!(p.metrics.write_offs.get(), 1);
    let dollars = p.metrics.written_off_dollars.get();
    assert!(
        (dollars - 2.0 * USD as f64 / 1e12).abs() < 1e-9,
        "{dollars}"
    );
    // Retried rounds write off nothing more.
    p.settle_now().await.unwrap();
    p.settle_now().await.unwrap();
    assert_eq!(p.metrics.write_offs.get(), 1);
    let offs: Vec<_> = rig
        .money
        .ledger()
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "write_off")
        .collect();
    assert_eq!(offs.len(), 1, "{offs:?}");
    assert_eq!(offs[0].amount, 2 * USD);
    assert_eq!(rig.audit().await, vec![]);
    // The payer withdraws all of the deposit; the books close, still with nothing unbacked.
    let payer_before = rig.token_balance(address(PAYER_KEY));
    rig.increase_time(30).await;
    assert!(rig.withdraw(PAYER_KEY, &id).await);
    assert_eq!(
        rig.token_balance(address(PAYER_KEY)),
        payer_before + 5_000_000
    );
    assert!(rig.chain.chain().channel(ch).is_none());
    p.settle_now().await.unwrap();
    assert_eq!(record(&rig, &id).await.lifecycle(), Lifecycle::Closed);
    assert_eq!(rig.available(&acct).await, 0);
    assert_eq!(p.metrics.write_offs.get(), 1);
    drop(chain);
    assert_eq!(rig.audit().await, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_that_lands_after_a_write_off_gives_the_credit_back() {
    let rig = Rig::start(1).await;
    rig.fund(PAYER_KEY);
    let acct = account(PAYER_KEY);
    let (id, ch) = channel_at(&rig, 3_000_000).await;
    assert!(rig.request_close(PAYER_KEY, &id).await);
    let (p, chain) = flaky_node(&rig).await;
    rig.increase_time(880).await;
    p.settle_now().await.unwrap();
    assert_eq!(rig.available(&acct).await, 0);
    assert_eq!(record(&rig, &id).await.lifecycle(), Lifecycle::WrittenOff);
    // The chain answers again before the payer withdrew: captured, and the $3 is backed again.
    chain.broken.store(false, Ordering::Release);
    p.settle_now().await.unwrap();
    assert_eq!(rig.chain.chain().channel(ch).unwrap().settled, 3_000_000);
    assert_eq!(record(&rig, &id).await.lifecycle(), Lifecycle::Captured);
    assert_eq!(rig.available(&acct).await, 3 * USD);
    p.settle_now().await.unwrap();
    assert_eq!(rig.available(&acct).await, 3 * USD, "given back once");
    assert_eq!(rig.audit().await, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_node_showing_no_close_request_never_reopens_the_channel() {
    let rig = Rig::start(1).await;
    rig.fund(PAYER_KEY);
    let acct = account(PAYER_KEY);
    let (id, _) = channel_at(&rig, 3_000_000).await;
    assert!(rig.request_close(PAYER_KEY, &id).await);
    let (p, chain) = flaky_node(&rig).await;
    // The escrow's log says "requested"; every read comes from a node that has not seen it.
    chain.stale_reads.store(true, Ordering::Release);
    p.watch_closes().await.unwrap();
    p.watch_closes().await.unwrap();
    let r = record(&rig, &id).await;
    assert_eq!(r.lifecycle(), Lifecycle::CloseRequested);
    assert!(r.state.closing, "a stale read reopened the channel");
    // Still nothing captured when the payer can almost withdraw: written off.
    rig.increase_time(880).await;
    p.watch_closes().await.unwrap();
    assert_eq!(rig.available(&acct).await, 0);
    assert_eq!(record(&rig, &id).await.lifecycle(), Lifecycle::WrittenOff);
    // The node catches up and the chain takes the capture: backed again, given back once.
    chain.stale_reads.store(false, Ordering::Release);
    chain.broken.store(false, Ordering::Release);
    p.watch_closes().await.unwrap();
    p.watch_closes().await.unwrap();
    assert_eq!(record(&rig, &id).await.lifecycle(), Lifecycle::Captured);
    assert_eq!(rig.available(&acct).await, 3 * USD);
    assert_eq!(rig.audit().await, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_off_racing_a_capture_on_another_node_never_sticks() {
    let rig = Rig::start(1).await;
    rig.fund(PAYER_KEY);
    let acct = account(PAYER_KEY);
    let (id, ch) = channel_at(&rig, 3_000_000).await;
    assert!(rig.request_close(PAYER_KEY, &id).await);
    let backend = Arc::new(Interleaved {
        inner: RedisChannels::connect(rig.redis.target(), "tollgate")
            .await
            .unwrap(),
        hook: tokio::sync::Mutex::new(None),
    });
    let (a, _chain) = faulty_node(&rig, backend.clone()).await;
    a.watch_closes().await.unwrap();
    rig.increase_time(880).await;
    // Node A cannot capture and decides to write off; node B captures just before A fixes the
    // amount of its write-off.
    let b = rig.nodes[0].payments.clone();
    *backend.hook.lock().await = Some(Box::pin(async move {
        b.watch_closes().await.unwrap();
    }));
    a.watch_closes().await.unwrap();
    assert_eq!(rig.chain.chain().channel(ch).unwrap().settled, 3_000_000);
    a.watch_closes().await.unwrap();
    rig.nodes[0].payments.watch_closes().await.unwrap();
    assert_eq!(record(&rig, &id).await.lifecycle(), Lifecycle::Captured);
    assert_eq!(
        rig.available(&acct).await,
        3 * USD,
        "captured credit written off"
    );
    assert_eq!(rig.audit().await, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_whose_answer_was_lost_is_found_at_the_close_and_the_write_off_given_back() {
    let rig = Rig::start(1).await;
    rig.fund(PAYER_KEY);
    let acct = account(PAYER_KEY);
    let (id, _) = channel_at(&rig, 3_000_000).await;
    assert!(rig.request_close(PAYER_KEY, &id).await);
    let (p, chain) = flaky_node(&rig).await;
    chain.broken.store(false, Ordering::Release);
    chain.lose_answer.store(true, Ordering::Release);
    // Late in the grace period the capture lands, but its answer is lost: written off.
    rig.increase_time(880).await;
    p.watch_closes().await.unwrap();
    assert_eq!(rig.available(&acct).await, 0);
    // The payer withdraws before the next round reads the channel: only the close event says
    // the payee got all $3.
    rig.increase_time(30).await;
    assert!(rig.withdraw(PAYER_KEY, &id).await);
    p.watch_closes().await.unwrap();
    let r = record(&rig, &id).await;
    assert_eq!(r.lifecycle(), Lifecycle::Closed);
    assert_eq!(r.closed_on_chain, Some(3_000_000));
    assert_eq!(
        rig.available(&acct).await,
        3 * USD,
        "captured credit kept written off"
    );
    p.watch_closes().await.unwrap();
    assert_eq!(rig.available(&acct).await, 3 * USD, "given back once");
    assert_eq!(rig.audit().await, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_whose_events_a_node_never_returns_is_still_found_and_closed() {
    let rig = Rig::start(1).await;
    rig.fund(PAYER_KEY);
    let acct = account(PAYER_KEY);
    let (id, ch) = channel_at(&rig, 3_000_000).await;
    let (p, chain) = flaky_node(&rig).await;
    chain.hide_events.store(true, Ordering::Release);
    assert!(rig.request_close(PAYER_KEY, &id).await);
    // The settlement round reads the channel, finds the request and hands it over.
    p.settle_now().await.unwrap();
    let r = record(&rig, &id).await;
    assert!(r.state.closing);
    assert_eq!(r.lifecycle(), Lifecycle::CloseRequested);
    rig.increase_time(880).await;
    p.settle_now().await.unwrap();
    assert_eq!(rig.available(&acct).await, 0);
    rig.increase_time(30).await;
    assert!(rig.withdraw(PAYER_KEY, &id).await);
    assert!(rig.chain.chain().channel(ch).is_none());
    // Gone, and the scan never brings its close event: looked up by channel after a few rounds.
    for _ in 0..5 {
        p.watch_closes().await.unwrap();
    }
    let r = record(&rig, &id).await;
    assert_eq!(r.lifecycle(), Lifecycle::Closed);
    assert_eq!(r.closed_on_chain, Some(0));
    assert_eq!(rig.available(&acct).await, 0);
    assert_eq!(rig.audit().await, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_caps_event_ranges_is_read_in_smaller_ranges_and_the_scan_keeps_up() {
    let rig = Rig::start(1).await;
    rig.fund(PAYER_KEY);
    let (id, ch) = channel_at(&rig, 2_000_000).await;
    let (p, chain) = flaky_node(&rig).await;
    chain.broken.store(false, Ordering::Release);
    chain.max_range.store(2, Ordering::Release);
    for _ in 0..5 {
        p.watch_closes().await.unwrap();
    }
    // Far more blocks than one round's ranges of this node cover, then the request.
    for _ in 0..150 {
        rig.increase_time(0).await;
    }
    assert!(rig.request_close(PAYER_KEY, &id).await);
    for _ in 0..15 {
        p.watch_closes().await.unwrap();
        if record(&rig, &id).await.lifecycle() == Lifecycle::Captured {
            break;
        }
    }
    assert!(chain.refused.load(Ordering::Acquire) > 0);
    assert_eq!(record(&rig, &id).await.lifecycle(), Lifecycle::Captured);
    assert_eq!(rig.chain.chain().channel(ch).unwrap().settled, 2_000_000);
    assert_eq!(rig.audit().await, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_off_fixed_by_a_node_that_died_is_carried_out_by_the_next() {
    let rig = Rig::start(1).await;
    rig.fund(PAYER_KEY);
    let acct = account(PAYER_KEY);
    let (id, _) = channel_at(&rig, 3_000_000).await;
    assert!(rig.request_close(PAYER_KEY, &id).await);
    let (p, _chain) = flaky_node(&rig).await;
    p.watch_closes().await.unwrap();
    rig.increase_time(880).await;
    // A node fixed the write-off's amount and died before the money store took it.
    p.backend()
        .update(
            &id,
            Box::new(|prev| {
                let mut r = prev.unwrap();
                r.forced_close.as_mut().unwrap().write_off_ask = Some(3 * USD);
                Ok(tollgate_payments::channels::Update {
                    record: r,
                    credits: Vec::new(),
                })
            }),
        )
        .await
        .unwrap();
    assert_eq!(rig.available(&acct).await, 3 * USD);
    p.watch_closes().await.unwrap();
    assert_eq!(
        rig.available(&acct).await,
        0,
        "the unbacked credit stayed spendable"
    );
    assert_eq!(record(&rig, &id).await.lifecycle(), Lifecycle::WrittenOff);
    assert_eq!(rig.audit().await, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_answered_after_the_books_closed_gives_nothing_back_twice() {
    let rig = Rig::start(1).await;
    rig.fund(PAYER_KEY);
    let acct = account(PAYER_KEY);
    let (id, _) = channel_at(&rig, 3_000_000).await;
    assert!(rig.request_close(PAYER_KEY, &id).await);
    let (a, chain) = flaky_node(&rig).await;
    a.watch_closes().await.unwrap();
    // Late in the grace period node A writes off, then its capture lands on chain but the
    // answer is slow to come back.
    rig.increase_time(880).await;
    chain.broken.store(false, Ordering::Release);
    chain.hold_answer.store(true, Ordering::Release);
    let a = Arc::new(a);
    let round = tokio::spawn({
        let a = a.clone();
        async move { a.watch_closes().await }
    });
    chain.landed.notified().await;
    assert_eq!(rig.available(&acct).await, 0);
    // Meanwhile the payer withdraws and node B closes the books on what the payee got: the
    // write-off is given back there.
    rig.increase_time(30).await;
    assert!(rig.withdraw(PAYER_KEY, &id).await);
    let b = &rig.nodes[0].payments;
    b.watch_closes().await.unwrap();
    assert_eq!(record(&rig, &id).await.lifecycle(), Lifecycle::Closed);
    assert_eq!(rig.available(&acct).await, 3 * USD);
    // A's answer arrives now: nothing more is given back.
    chain.release.notify_one();
    round.await.unwrap().unwrap();
    a.watch_closes().await.unwrap();
    b.watch_closes().await.unwrap();
    assert_eq!(rig.available(&acct).await, 3 * USD, "given back twice");
    assert_eq!(rig.audit().await, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_that_keeps_failing_does_not_spin_the_watcher() {
    let rig = Rig::start(1).await;
    rig.fund(PAYER_KEY);
    let (id, _) = channel_at(&rig, 3_000_000).await;
    assert!(rig.request_close(PAYER_KEY, &id).await);
    let (p, chain) = flaky_node(&rig).await;
    let p = Arc::new(p);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(p.clone().run(stop_rx));
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    stop.send(true).unwrap();
    task.await.unwrap();
    assert_eq!(
        record(&rig, &id).await.lifecycle(),
        Lifecycle::CloseRequested
    );
    // One round at start (the interval is 10 s); a wake-up loop would have run hundreds.
    let rounds = chain.heads.load(Ordering::Acquire);
    assert!(rounds <= 3, "{rounds} watcher rounds in 1.5 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_close_request_is_its_own_case_with_its_own_write_off() {
    let rig = Rig::start(1).await;
    rig.fund(PAYER_KEY);
    let acct = account(PAYER_KEY);
    let (id, _) = channel_at(&rig, 3_000_000).await;
    let (p, _chain) = flaky_node(&rig).await;
    // Requested, cancelled and requested again before the watcher looks: one open case, the
    // second.
    assert!(rig.request_close(PAYER_KEY, &id).await);
    assert!(rig.cancel_close(PAYER_KEY, &id).await);
    assert!(rig.request_close(PAYER_KEY, &id).await);
    p.watch_closes().await.unwrap();
    let f = record(&rig, &id).await.forced_close.unwrap();
    assert_eq!((f.cycle, f.cancelled), (2, false));
    // Written off as the grace period ends, given back when the payer cancels with a top-up.
    rig.increase_time(880).await;
    p.watch_closes().await.unwrap();
    assert_eq!(rig.available(&acct).await, 0);
    assert!(rig.cancel_close(PAYER_KEY, &id).await);
    p.watch_closes().await.unwrap();
    let r = record(&rig, &id).await;
    assert_eq!(rig.available(&acct).await, 3 * USD);
    assert!(!r.state.closing);
    assert_eq!(r.lifecycle(), Lifecycle::Active);
    // A third request is a new case: written off again under its own key.
    assert!(rig.request_close(PAYER_KEY, &id).await);
    p.watch_closes().await.unwrap();
    assert_eq!(record(&rig, &id).await.forced_close.unwrap().cycle, 3);
    rig.increase_time(880).await;
    p.watch_closes().await.unwrap();
    assert_eq!(rig.available(&acct).await, 0);
    let keys: Vec<_> = rig
        .money
        .ledger()
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "write_off")
        .map(|e| e.key)
        .collect();
    assert_eq!(
        keys,
        vec![
            format!("write_off:mpp-writeoff:{id}:2"),
            format!("write_off:mpp-writeoff:{id}:3")
        ]
    );
    assert_eq!(rig.audit().await, vec![]);
}

/// A channel store that runs `hook` once, just before the next update: another node's work
/// landing between a read and the update that depends on it.
struct Interleaved {
    inner: RedisChannels,
    hook: tokio::sync::Mutex<Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>>,
}

#[async_trait]
impl ChannelBackend for Interleaved {
    async fn get(&self, id: &str) -> Result<Option<ChannelRecord>, mpp::VerificationError> {
        self.inner.get(id).await
    }
    async fn update(&self, id: &str, f: Updater) -> Result<ChannelRecord, mpp::VerificationError> {
        let hook = self.hook.lock().await.take();
        if let Some(h) = hook {
            h.await;
        }
        self.inner.update(id, f).await
    }
    async fn pending_credits(&self) -> Result<Vec<PendingCredit>, mpp::VerificationError> {
        self.inner.pending_credits().await
    }
    async fn add_pending(&self, c: &PendingCredit) -> Result<(), mpp::VerificationError> {
        self.inner.add_pending(c).await
    }
    async fn hold(&self, c: &PendingCredit) -> Result<(), mpp::VerificationError> {
        self.inner.hold(c).await
    }
    async fn held_credits(&self) -> Result<Vec<PendingCredit>, mpp::VerificationError> {
        self.inner.held_credits().await
    }
    async fn unhold(
        &self,
        key: &str,
        due: Option<&PendingCredit>,
    ) -> Result<bool, mpp::VerificationError> {
        self.inner.unhold(key, due).await
    }
    async fn credit_done(&self, key: &str) -> Result<(), mpp::VerificationError> {
        self.inner.credit_done(key).await
    }
    async fn channel_ids(&self) -> Result<Vec<String>, mpp::VerificationError> {
        self.inner.channel_ids().await
    }
    async fn poison(&self, p: &PoisonedCredit) -> Result<(), mpp::VerificationError> {
        self.inner.poison(p).await
    }
    async fn poisoned(&self) -> Result<Vec<PoisonedCredit>, mpp::VerificationError> {
        self.inner.poisoned().await
    }
    async fn unpoison(
        &self,
        key: &str,
        retry: bool,
    ) -> Result<Option<PoisonedCredit>, mpp::VerificationError> {
        self.inner.unpoison(key, retry).await
    }
    async fn meta_get(&self, key: &str) -> Result<Option<String>, mpp::VerificationError> {
        self.inner.meta_get(key).await
    }
    async fn meta_set(&self, key: &str, value: &str) -> Result<(), mpp::VerificationError> {
        self.inner.meta_set(key, value).await
    }
    async fn forced_add(&self, id: &str) -> Result<(), mpp::VerificationError> {
        self.inner.forced_add(id).await
    }
    async fn forced_remove(&self, id: &str) -> Result<(), mpp::VerificationError> {
        self.inner.forced_remove(id).await
    }
    async fn forced_ids(&self) -> Result<Vec<String>, mpp::VerificationError> {
        self.inner.forced_ids().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_below_a_voucher_accepted_meanwhile_on_another_node_is_refused() {
    let rig = Rig::start(2).await;
    rig.fund(PAYER_KEY);
    let acct = account(PAYER_KEY);
    let (id, ch) = channel_at(&rig, 2_000_000).await;
    let escrow = rig.config().escrow;
    let backend = Arc::new(Interleaved {
        inner: RedisChannels::connect(rig.redis.target(), "tollgate")
            .await
            .unwrap(),
        hook: tokio::sync::Mutex::new(None),
    });
    let a = Payments::new(
        rig.config(),
        backend.clone(),
        Arc::new(mpp::MemoryStore::new()),
        rig.money.clone(),
        Arc::new(
            RpcChain::new(
                &rig.chain.url(),
                PAYEE_KEY.parse().unwrap(),
                rig.config().chain_id,
                escrow,
            )
            .unwrap(),
        ),
    )
    .unwrap();
    // Node B accepts a $3 voucher after A read the channel at $2 for a close at $2, and before
    // A records that close.
    let b = rig.nodes[1].payments.clone();
    let higher = voucher(&b, &id, 3_000_000, sign(PAYER_KEY, ch, 3_000_000, escrow));
    *backend.hook.lock().await = Some(Box::pin(async move {
        b.accept(&higher).await.unwrap();
    }));
    let close = close_cred(&a, &id, 2_000_000, ch, escrow);
    let e = a.accept(&close).await.unwrap_err();
    assert!(!e.retryable, "{e:?}");
    assert!(
        e.problem.problem_type.ends_with("verification-failed"),
        "{e:?}"
    );
    assert!(
        e.problem
            .detail
            .contains("below the accepted cumulative 3000000"),
        "{e:?}"
    );
    assert_eq!(rig.available(&acct).await, 3 * USD);
    let r = record(&rig, &id).await;
    assert!(
        r.close.is_none(),
        "a close below an accepted voucher was recorded"
    );
    assert!(!r.state.closing);
    assert_eq!(rig.audit().await, vec![]);
    // A close at the accepted cumulative goes through: nothing spent, all of it refunded.
    let ok = a
        .accept(&close_cred(&a, &id, 3_000_000, ch, escrow))
        .await
        .unwrap();
    assert_eq!(ok.accepted_cumulative, 3_000_000);
    assert_eq!(rig.available(&acct).await, 0);
    assert_eq!(rig.audit().await, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_that_can_never_apply_is_set_aside_and_the_others_go_on() {
    let rig = Rig::start(1).await;
    let p = &rig.nodes[0].payments;
    let backend = p.backend();
    // A reversal over the per-operation cap, then twenty payers' credits.
    let poison = PendingCredit {
        key: "refund:deploy:huge".into(),
        account: "did:pkh:eip155:42431:0x00000000000000000000000000000000000000aa".into(),
        picos: tollgate_metering::MAX_OP_AMOUNT + 1,
        reverses: Some("deploy:huge".into()),
        not_before_ms: None,
    };
    backend.add_pending(&poison).await.unwrap();
    let payers: Vec<String> = (0..20)
        .map(|i| format!("did:pkh:eip155:42431:0x{:040x}", 0x100 + i))
        .collect();
    for (i, a) in payers.iter().enumerate() {
        backend
            .add_pending(&PendingCredit {
                key: format!("mpp-test:{i}"),
                account: a.clone(),
                picos: USD,
                reverses: None,
                not_before_ms: None,
            })
            .await
            .unwrap();
    }
    // Drained (as the background drain does, every second) — retried several times.
    for _ in 0..3 {
        let _ = p.drain_credits().await;
    }
    for a in &payers {
        assert_eq!(
            rig.available(a).await,
            USD,
            "{a} is held up by another's credit"
        );
    }
    assert!(backend.pending_credits().await.unwrap().is_empty());
    let set_aside = p.poisoned_credits().await.unwrap();
    assert_eq!(set_aside.len(), 1);
    assert_eq!(set_aside[0].credit, poison);
    assert!(
        set_aside[0].reason.contains("charge"),
        "{}",
        set_aside[0].reason
    );
    assert_eq!(p.metrics.credits_poisoned.get(), 1);
    assert_eq!(p.metrics.credits_poisoned_now.get(), 1);
    // The audit names it until an operator resolves it.
    let diffs = rig.audit().await;
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    assert!(diffs[0].what.contains("set aside"));
    let gone = p.resolve_poisoned(&poison.key, false).await.unwrap();
    assert_eq!(gone.unwrap().credit, poison);
    assert!(
        p.resolve_poisoned(&poison.key, false)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(rig.audit().await, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_drained_before_its_charge_landed_still_reverses_it() {
    let rig = Rig::start(1).await;
    let p = &rig.nodes[0].payments;
    let acct = "did:pkh:eip155:42431:0x00000000000000000000000000000000000000bb";
    rig.money.credit(acct, "direct:1", USD / 2).await.unwrap();
    // A deploy charge of $1 whose answer was lost: it is reversed before it has landed (the
    // balance cannot even cover it yet).
    p.reverse_charge(acct, "deploy:lost", USD).await.unwrap();
    assert!(p.backend().pending_credits().await.unwrap().is_empty());
    // A top-up, then the charge lands after all (a retry, a delayed write).
    rig.money.credit(acct, "direct:2", 2 * USD).await.unwrap();
    let late = rig
        .money
        .charge(acct, "deploy:lost", USD, false)
        .await
        .unwrap();
    assert!(
        !late.applied,
        "the charge landed after its reversal was done"
    );
    // Nothing of it stays charged: $0.50 + $2.
    assert_eq!(rig.available(acct).await, 5 * USD / 2);
    // And retried reversals change nothing.
    p.reverse_charge(acct, "deploy:lost", USD).await.unwrap();
    assert_eq!(rig.available(acct).await, 5 * USD / 2);
    assert_eq!(rig.audit().await, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_for_one_realm_is_useless_at_the_other() {
    use tollgate_payments::Realm;
    let rig = Rig::start(1).await;
    rig.fund(PAYER_KEY);
    let (id, ch) = channel_at(&rig, 1_000_000).await;
    let p = &rig.nodes[0].payments;
    let escrow = rig.config().escrow;
    assert_eq!(p.realm_name(Realm::Platform), "tollgate");
    assert_eq!(p.realm_name(Realm::Services), "tollgate/services");
    // A voucher paid on a hosted service's 402 (the services realm) ...
    let mut at_service = voucher(p, &id, 2_000_000, sign(PAYER_KEY, ch, 2_000_000, escrow));
    at_service.challenge = p
        .session_challenge_in(Realm::Services, 1_000_000, None)
        .unwrap()
        .to_echo();
    // ... neither pays nor identifies over MCP,
    refused(p.accept(&at_service).await, "invalid-challenge");
    let e = p.identify(&at_service).await.unwrap_err();
    assert!(
        e.problem.problem_type.ends_with("invalid-challenge"),
        "{e:?}"
    );
    // ... and is good where it was issued, once.
    let a = p.accept_in(Realm::Services, &at_service).await.unwrap();
    assert_eq!(a.accepted_cumulative, 2_000_000);
    assert_eq!(rig.available(&account(PAYER_KEY)).await, 2 * USD);
    // The other way round: an MCP credential is refused at a hosted service.
    let at_mcp = voucher(p, &id, 3_000_000, sign(PAYER_KEY, ch, 3_000_000, escrow));
    refused(
        p.accept_in(Realm::Services, &at_mcp).await,
        "invalid-challenge",
    );
    // Identity challenges are short-lived.
    let idc = p.identity_challenge().unwrap();
    let expires = time::OffsetDateTime::parse(
        idc.expires.as_deref().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(expires - time::OffsetDateTime::now_utc() <= time::Duration::seconds(61));
    assert_eq!(idc.realm, "tollgate");
    assert_eq!(rig.audit().await, vec![]);
}

/// A start's charge (a deploy) gives itself back unless the start goes live: its reversal is
/// held before the charge, released when the start goes live, made due at once when it fails,
/// and due at its deadline when nobody says (the process died mid-deploy, the call was dropped).
/// Every path retried changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_charge_stands_only_if_the_start_went_live() {
    let rig = Rig::start(1).await;
    let p = &rig.nodes[0].payments;
    let acct = "did:pkh:eip155:42431:0x00000000000000000000000000000000000000cc";
    rig.money.credit(acct, "direct:s", 10 * USD).await.unwrap();
    let hold = std::time::Duration::from_secs(600);
    // Live: held, charged, released. The charge stands, even after the drain runs.
    p.hold_reversal(acct, "deploy:live", USD, hold)
        .await
        .unwrap();
    rig.money
        .charge(acct, "deploy:live", USD, false)
        .await
        .unwrap();
    p.drain_credits().await.unwrap();
    assert_eq!(rig.available(acct).await, 9 * USD, "held, not applied");
    assert!(p.release_reversal("deploy:live").await.unwrap());
    assert!(
        !p.release_reversal("deploy:live").await.unwrap(),
        "released once"
    );
    p.drain_credits().await.unwrap();
    assert_eq!(rig.available(acct).await, 9 * USD);
    // Failed: the held reversal is made due now.
    p.hold_reversal(acct, "deploy:failed", USD, hold)
        .await
        .unwrap();
    rig.money
        .charge(acct, "deploy:failed", USD, false)
        .await
        .unwrap();
    p.reverse_charge(acct, "deploy:failed", USD).await.unwrap();
    p.reverse_charge(acct, "deploy:failed", USD).await.unwrap();
    assert_eq!(rig.available(acct).await, 9 * USD, "given back once");
    // Nobody says (the process died after the charge): due at the deadline, not before.
    p.hold_reversal(
        acct,
        "deploy:orphan",
        USD,
        std::time::Duration::from_millis(300),
    )
    .await
    .unwrap();
    rig.money
        .charge(acct, "deploy:orphan", USD, false)
        .await
        .unwrap();
    p.drain_credits().await.unwrap();
    assert_eq!(rig.available(acct).await, 8 * USD);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    p.drain_credits().await.unwrap();
    p.drain_credits().await.unwrap();
    assert_eq!(
        rig.available(acct).await,
        9 * USD,
        "given back at the deadline, once"
    );
    assert!(p.backend().pending_credits().await.unwrap().is_empty());
    assert!(p.backend().held_credits().await.unwrap().is_empty());
    // A live start whose deadline passed first: given for free, and said so.
    p.hold_reversal(acct, "deploy:slow", USD, std::time::Duration::ZERO)
        .await
        .unwrap();
    rig.money
        .charge(acct, "deploy:slow", USD, false)
        .await
        .unwrap();
    p.drain_credits().await.unwrap();
    assert!(!p.release_reversal("deploy:slow").await.unwrap());
    assert_eq!(rig.available(acct).await, 9 * USD);
    // Past its deadline but released before the drain looked: the release wins, the charge
    // stands (the drain makes pending only what it takes out of the held ones).
    p.hold_reversal(acct, "deploy:just", USD, std::time::Duration::ZERO)
        .await
        .unwrap();
    rig.money
        .charge(acct, "deploy:just", USD, false)
        .await
        .unwrap();
    assert!(p.release_reversal("deploy:just").await.unwrap());
    p.drain_credits().await.unwrap();
    assert_eq!(rig.available(acct).await, 8 * USD);
    assert_eq!(rig.audit().await, vec![]);
}
