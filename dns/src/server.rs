//! The TCP transport: hickory-server's `Server` framing queries for the shared handler.

use std::time::Instant;

use hickory_proto::op::{Message, ResponseCode};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

use crate::handler::Handler;
use crate::metrics::{Counted, Plugin};

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let start = Instant::now();
        let (resp, plugin) = match Message::from_vec(request.as_slice()) {
            Ok(req) => self.answer_from(&req, request.src().ip()).await,
            Err(_) => {
                self.metrics.malformed.inc();
                let mut m = Message::error_msg(
                    request.metadata.id,
                    request.metadata.op_code,
                    ResponseCode::FormErr,
                );
                m.metadata.message_type = hickory_proto::op::MessageType::Response;
                (m, Plugin::None)
            }
        };
        let qtype = request
            .queries
            .queries()
            .first()
            .map_or(0, |q| u16::from(q.query_type()));
        self.metrics.count(
            Counted {
                qtype,
                rcode: resp.metadata.response_code.low(),
                ipv6: request.src().ip().to_canonical().is_ipv6(),
                tcp: true,
                plugin,
            },
            1,
        );
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &resp.edns {
            builder.edns(e);
        }
        let response = builder.build(
            resp.metadata,
            resp.answers.iter(),
            resp.authorities.iter(),
            std::iter::empty(),
            resp.additionals.iter(),
        );
        let info = match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "sending DNS response");
                let mut metadata = resp.metadata;
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(hickory_proto::op::Header {
                    metadata,
                    counts: hickory_proto::op::HeaderCounts::default(),
                })
            }
        };
        self.metrics.observe(qtype, start.elapsed().as_secs_f64());
        info
    }
}
