//! A tiny tracing subscriber for plugin libraries: it formats each event and hands it to the
//! host's log callback, so `tracing::info!` in a plugin shows up in the host's output.

use crate::abi::LogFn;
use abi_stable::std_types::RString;
use std::fmt::Write;
use tracing::{field::Field, span, Event, Level, Metadata, Subscriber};

struct Forward(LogFn);

/// Level numbers on the wire: 1 = error, 2 = warn, 3 = info, 4 = debug, 5 = trace.
pub fn level_number(l: &Level) -> u8 {
    match *l {
        Level::ERROR => 1,
        Level::WARN => 2,
        Level::INFO => 3,
        Level::DEBUG => 4,
        Level::TRACE => 5,
    }
}

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl Subscriber for Forward {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        let meta = event.metadata();
        (self.0.log)(level_number(meta.level()), RString::from(meta.target()), RString::from(fields.0));
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

/// Called once when the host loads the library. A library statically linked into the host
/// shares the host's subscriber, and the host never calls this for it.
pub fn install(f: LogFn) {
    let _ = tracing::subscriber::set_global_default(Forward(f));
}
