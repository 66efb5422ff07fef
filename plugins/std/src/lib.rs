pith_plugin_api::export_plugin!("pith-std");
