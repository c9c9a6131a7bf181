//! The delivery status notification the scheduler queues for a message's permanent
//! failures: to the envelope sender, from the null sender, never for the null sender.

use crate::config::Config;
use crate::deliver::{Reply, dsn};
use crate::queue::{Claimed, NewMessage, NewRecipient, QueueId, Source};

/// The notification for `failed` recipients of the message `first` belongs to, with the
/// `original` message quoted; `None` when the sender is null or not an address.
pub(crate) fn notification(
    config: &Config,
    first: &Claimed,
    original: &[u8],
    failed: &[(String, Reply)],
    queue_id: QueueId,
    now: i64,
) -> Option<NewMessage> {
    let sender = crate::address::parse(&first.sender).ok()?;
    let list: Vec<dsn::Failed<'_>> = failed
        .iter()
        .map(|(recipient, reply)| dsn::Failed { recipient, reply })
        .collect();
    let body = dsn::build(
        &config.server.hostname,
        &first.queue_id,
        original,
        &list,
        now,
    );
    Some(NewMessage {
        queue_id,
        sender: String::new(),
        campaign: first.campaign.clone(),
        source: Source::Bounce,
        client: "bounce".into(),
        identity: None,
        body,
        recipients: vec![NewRecipient {
            address: sender.address,
            domain: sender.domain,
        }],
        smtputf8: false,
    })
}
