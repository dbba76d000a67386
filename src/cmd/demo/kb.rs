//! The demo's knowledge base: a dozen help-desk questions, the chunks a retriever returns for each, an
//! answer that restates the chunks (grounded) and one about something else entirely (off-topic, other
//! vocabulary), which is what a bad canary — a new prompt, model or index — sends back.

/// One question, its retrieved chunks, a grounded answer and an off-topic one.
pub struct Topic {
    pub question: &'static str,
    pub chunks: &'static [&'static str],
    pub grounded: &'static str,
    pub off_topic: &'static str,
}

pub const TOPICS: [Topic; 12] = [
    Topic {
        question: "How do I reset my account password if I forgot it?",
        chunks: &[
            "To reset a forgotten account password, open the sign-in page and choose Forgot password. \
             Enter the email address linked to your account and we send a reset link.",
            "The password reset link expires after 30 minutes. If the link expired, request a new reset \
             email from the sign-in page.",
        ],
        grounded: "Open the sign-in page, choose Forgot password and enter the email address linked to \
                   your account. We send a reset link to that email; the link expires after 30 minutes, \
                   so request a new reset email if it expired.",
        off_topic: "Our quarterly picnic features grilled vegetables, fresh lemonade and a jazz band \
                    playing by the lake until sunset.",
    },
    Topic {
        question: "What is the refund policy for annual subscriptions?",
        chunks: &[
            "Annual subscriptions can be refunded in full within 14 days of purchase. After 14 days, the \
             refund is prorated for the unused months.",
            "Refunds go back to the original payment method and usually arrive within five business days.",
        ],
        grounded: "Annual subscriptions are refunded in full within 14 days of purchase; after that the \
                   refund is prorated for the unused months. Refunds go back to the original payment \
                   method within five business days.",
        off_topic: "Mountain gorillas live in dense forests, eat mostly leaves and shoots, and travel in \
                    small troops led by a silverback.",
    },
    Topic {
        question: "Can I export my project data to CSV?",
        chunks: &[
            "Project owners can export project data to CSV or JSON from the Settings page, under Data \
             export.",
            "Large exports are prepared in the background, and a download link is emailed when the \
             export file is ready.",
        ],
        grounded: "Project owners can export project data to CSV or JSON from the Settings page under \
                   Data export; large exports are prepared in the background and a download link is \
                   emailed when the file is ready.",
        off_topic: "The bakery on Elm Street sells sourdough loaves, cinnamon rolls and almond \
                    croissants every morning before nine.",
    },
    Topic {
        question: "How do I turn on two-factor authentication?",
        chunks: &[
            "Two-factor authentication is turned on from the Security tab of your profile. Scan the QR \
             code with an authenticator app and enter the six-digit code.",
            "After you turn on two-factor authentication, save the recovery codes in a safe place; each \
             recovery code works once.",
        ],
        grounded: "Go to the Security tab of your profile, scan the QR code with an authenticator app and \
                   enter the six-digit code to turn on two-factor authentication. Save the recovery codes \
                   in a safe place, since each code works once.",
        off_topic: "Saturn's rings are made of countless ice particles, ranging in size from tiny grains \
                    to boulders as large as houses.",
    },
    Topic {
        question: "How many team members can I invite on the Pro plan?",
        chunks: &[
            "The Pro plan includes up to 25 team members. Owners invite members from the Team page by \
             entering their email addresses.",
            "Invitations expire after seven days; an owner can resend an expired invitation from the \
             Team page.",
            "Teams that need more than 25 members can upgrade to the Business plan at any time.",
        ],
        grounded: "The Pro plan includes up to 25 team members, invited by email from the Team page. \
                   Invitations expire after seven days and can be resent; for more than 25 members, \
                   upgrade to the Business plan.",
        off_topic: "Emperor penguins huddle together through the Antarctic winter, taking turns at the \
                    windy edge of the crowd to keep warm.",
    },
    Topic {
        question: "Why was my payment card declined?",
        chunks: &[
            "A payment card is declined when the bank refuses the charge, the card has expired, or the \
             billing address does not match the card.",
            "Update the card or the billing address under Billing, then retry the payment; declined \
             charges are retried automatically after three days.",
        ],
        grounded: "Your card was declined because the bank refused the charge, the card expired, or the \
                   billing address does not match. Update the card or billing address under Billing and \
                   retry the payment; declined charges are also retried automatically after three days.",
        off_topic: "Volcanic eruptions in Iceland often create new black sand beaches, where basalt \
                    columns rise above the cold surf.",
    },
    Topic {
        question: "How do I delete my account permanently?",
        chunks: &[
            "To delete your account permanently, open Settings, choose Account, then Delete account, and \
             confirm with your password.",
            "Deleted accounts are kept for 30 days in case you change your mind; after 30 days all data \
             is erased and cannot be restored.",
        ],
        grounded: "Open Settings, choose Account, then Delete account and confirm with your password. The \
                   account is kept for 30 days in case you change your mind; after 30 days all data is \
                   erased and cannot be restored.",
        off_topic: "A good espresso needs finely ground beans, water just below boiling and about \
                    twenty-five seconds of extraction.",
    },
    Topic {
        question: "What are the API rate limits?",
        chunks: &[
            "The API allows 600 requests per minute per access token. Requests over the limit receive \
             HTTP status 429 with a Retry-After header.",
            "Rate limit headers on every response show the remaining requests and when the limit \
             window resets.",
        ],
        grounded: "The API allows 600 requests per minute per access token; requests over the limit \
                   receive status 429 with a Retry-After header. Rate limit headers on every response \
                   show the remaining requests and when the window resets.",
        off_topic: "Medieval castles were built with thick stone walls, narrow arrow slits and deep \
                    moats to keep invading armies away.",
    },
    Topic {
        question: "How do I connect the Slack integration?",
        chunks: &[
            "To connect Slack, open Integrations, choose Slack and click Connect; sign in to your Slack \
             workspace and approve the permissions.",
            "After connecting, pick the Slack channel that receives notifications; you can change the \
             channel later from Integrations.",
        ],
        grounded: "Open Integrations, choose Slack and click Connect, then sign in to your Slack \
                   workspace and approve the permissions. Pick the channel that receives notifications; \
                   you can change the channel later from Integrations.",
        off_topic: "Tomato seedlings grow best in warm soil with plenty of sunlight, regular watering and \
                    a sturdy stake for support.",
    },
    Topic {
        question: "Where can I download my invoices?",
        chunks: &[
            "Invoices are listed under Billing, in the Invoices section; each invoice can be downloaded \
             as a PDF.",
            "A copy of every invoice is also emailed to the billing contact when the payment succeeds.",
        ],
        grounded: "Your invoices are listed under Billing in the Invoices section, and each invoice can \
                   be downloaded as a PDF. A copy of every invoice is also emailed to the billing \
                   contact when the payment succeeds.",
        off_topic: "Humpback whales sing long, complex songs that can travel for miles through the \
                    ocean during the breeding season.",
    },
    Topic {
        question: "How do I change the language of the interface?",
        chunks: &[
            "The interface language is changed under Profile, Preferences, Language; the change applies \
             after the page reloads.",
            "Supported interface languages include English, German, French, Spanish and Japanese.",
        ],
        grounded: "Change the interface language under Profile, Preferences, Language; the change \
                   applies after the page reloads. Supported languages include English, German, French, \
                   Spanish and Japanese.",
        off_topic: "Marathon runners often eat pasta the night before a race and sip sports drinks at \
                    every station along the course.",
    },
    Topic {
        question: "Is my data encrypted at rest?",
        chunks: &[
            "All customer data is encrypted at rest with AES-256, and encryption keys are rotated every \
             90 days.",
            "Data in transit is protected with TLS 1.2 or newer between your browser and our servers.",
            "Backups are encrypted with the same keys and stored in a separate region.",
        ],
        grounded: "Yes: all customer data is encrypted at rest with AES-256, with encryption keys rotated \
                   every 90 days, and backups are encrypted with the same keys in a separate region. Data \
                   in transit is protected with TLS 1.2 or newer.",
        off_topic: "Hot air balloons rise because the heated air inside the envelope is lighter than the \
                    cooler air around it.",
    },
];

/// The topic whose question the asked text contains.
pub fn topic_of(asked: &str) -> Option<&'static Topic> {
    TOPICS.iter().find(|t| asked.contains(t.question))
}
