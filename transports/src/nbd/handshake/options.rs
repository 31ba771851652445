//! The option handlers of a handshake session: one per option type, each writing its replies
//! and saying whether the negotiation goes on, ends, or enters transmission.

use std::io::{self, Read, Write};

use super::super::wire::{
    ClientOption, ExportNameReply, InfoRequest, MetaContextRequest, OptionReply, INFO_BLOCK_SIZE,
    INFO_DESCRIPTION, INFO_NAME, MAX_OPTION_LEN, META_CONTEXT_BASE_ALLOCATION, OPT_EXPORT_NAME,
    REP_ERR_BLOCK_SIZE_REQD, REP_ERR_EXT_HEADER_REQD, REP_ERR_INVALID, REP_ERR_POLICY,
    REP_ERR_SHUTDOWN, REP_ERR_TLS_REQD, REP_ERR_TOO_BIG, REP_ERR_UNKNOWN, REP_ERR_UNSUP,
};
use super::super::{ExportInfo, Negotiated};
use super::{
    block_size, error, transmission_flags, HandshakeError, MetaSelection, Session, Step,
    BASE_ALLOCATION_ID, MAX_DISCARD_BYTES,
};

impl<S: Read + Write> Session<'_, S> {
    pub(super) fn reply(&mut self, option: u32, replies: &[OptionReply<'_>]) -> io::Result<()> {
        self.out.clear();
        for r in replies {
            r.encode(option, &mut self.out);
        }
        self.stream.write_all(&self.out)?;
        self.stream.flush()
    }

    /// Reads and drops the payload of an option longer than [`MAX_OPTION_LEN`], then answers
    /// `REP_ERR_TOO_BIG`; hangs up if it is absurdly long or is `OPT_EXPORT_NAME` (which cannot
    /// be answered with an error).
    pub(super) fn skip_oversized(
        &mut self,
        option: u32,
        length: u32,
    ) -> Result<(), HandshakeError> {
        if option == OPT_EXPORT_NAME || u64::from(length) > MAX_DISCARD_BYTES {
            return Err(HandshakeError::OptionTooLarge { option, length });
        }
        let skipped = io::copy(
            &mut (&mut *self.stream).take(u64::from(length)),
            &mut io::sink(),
        )?;
        if skipped != u64::from(length) {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        let message =
            format!("option data of {length} bytes exceeds the limit of {MAX_OPTION_LEN} bytes");
        self.reply(option, &[error(REP_ERR_TOO_BIG, &message)])?;
        Ok(())
    }

    /// The canonical name of the export `name` selects (the default export for "").
    fn resolve(&self, name: &str) -> Option<String> {
        if name.is_empty() {
            self.catalog.default_export()
        } else {
            Some(name.to_string())
        }
    }

    /// Open the export `name` selects, or the error reply that says why not: no such export
    /// (`REP_ERR_UNKNOWN`), or one the catalog refuses to export here (`REP_ERR_POLICY`, with
    /// the reason, e.g. a replica copy).
    fn open_export(
        &self,
        name: &str,
    ) -> Result<(ExportInfo, ringblock_engine::VolumeHandle), (u32, String)> {
        let unknown = || (REP_ERR_UNKNOWN, format!("no export named {name:?}"));
        let resolved = self.resolve(name).ok_or_else(unknown)?;
        if let Some(reason) = self.catalog.refusal(&resolved) {
            return Err((REP_ERR_POLICY, reason));
        }
        self.catalog.open(&resolved).ok_or_else(unknown)
    }

    pub(super) fn handle(&mut self, option: ClientOption<'_>) -> Result<Step, HandshakeError> {
        let code = option.option();
        if let ClientOption::Abort = option {
            // The client may already have closed its end; the session is over either way.
            let _ = self.reply(code, &[OptionReply::Ack]);
            return Ok(Step::Abort);
        }
        if let ClientOption::ExportName(name) = option {
            return self.export_name(name);
        }
        if self.cfg.stopping() {
            self.reply(code, &[error(REP_ERR_SHUTDOWN, "server is shutting down")])?;
            return Ok(Step::Continue);
        }
        if self.cfg.tls_required && !matches!(option, ClientOption::StartTls) {
            self.reply(
                code,
                &[error(REP_ERR_TLS_REQD, "TLS is required by this server")],
            )?;
            return Ok(Step::Continue);
        }
        match option {
            ClientOption::Abort | ClientOption::ExportName(_) => unreachable!("handled above"),
            ClientOption::List => {
                let exports = self.catalog.list();
                let mut replies: Vec<OptionReply<'_>> = exports
                    .iter()
                    .map(|e| OptionReply::Server {
                        name: &e.name,
                        description: &e.description,
                    })
                    .collect();
                replies.push(OptionReply::Ack);
                self.reply(code, &replies)?;
            }
            ClientOption::StartTls => {
                self.reply(
                    code,
                    &[error(REP_ERR_UNSUP, "TLS is not supported by this server")],
                )?;
            }
            ClientOption::Info(req) => return self.info_or_go(code, req, false),
            ClientOption::Go(req) => return self.info_or_go(code, req, true),
            ClientOption::StructuredReply => {
                if self.extended {
                    self.reply(
                        code,
                        &[error(
                            REP_ERR_EXT_HEADER_REQD,
                            "extended headers are negotiated and take precedence",
                        )],
                    )?;
                } else if self.structured {
                    self.reply(
                        code,
                        &[error(
                            REP_ERR_INVALID,
                            "structured replies are already negotiated",
                        )],
                    )?;
                } else {
                    self.structured = true;
                    self.reply(code, &[OptionReply::Ack])?;
                }
            }
            ClientOption::ExtendedHeaders => {
                if self.extended {
                    self.reply(
                        code,
                        &[error(
                            REP_ERR_INVALID,
                            "extended headers are already negotiated",
                        )],
                    )?;
                } else {
                    self.extended = true;
                    self.reply(code, &[OptionReply::Ack])?;
                }
            }
            ClientOption::ListMetaContext(req) => self.list_meta_context(code, req)?,
            ClientOption::SetMetaContext(req) => self.set_meta_context(code, req)?,
            ClientOption::Unknown { option, .. } => {
                let message = format!("option {option} is not supported");
                self.reply(code, &[error(REP_ERR_UNSUP, &message)])?;
            }
        }
        Ok(Step::Continue)
    }

    fn export_name(&mut self, name: &str) -> Result<Step, HandshakeError> {
        let refuse = |reason| {
            Err(HandshakeError::ExportNameRefused {
                name: name.to_string(),
                reason,
            })
        };
        if self.extended {
            return refuse("OPT_EXPORT_NAME is forbidden after extended headers");
        }
        if self.cfg.tls_required {
            return refuse("TLS is required");
        }
        if self.cfg.stopping() {
            return refuse("server is shutting down");
        }
        let (info, handle) = match self.open_export(name) {
            Ok(opened) => opened,
            Err((REP_ERR_POLICY, _)) => {
                return refuse("the export is refused by policy (a replica copy)")
            }
            Err(_) => return refuse("no such export"),
        };
        let bs = block_size(&info);
        if self.cfg.require_block_size && bs.min > 1 {
            return refuse("the export needs block size constraints, which require OPT_GO");
        }
        let flags = transmission_flags(&info, self.structured);
        self.out.clear();
        ExportNameReply {
            size: info.size_bytes,
            flags,
        }
        .encode(self.no_zeroes, &mut self.out);
        self.stream.write_all(&self.out)?;
        self.stream.flush()?;
        Ok(Step::Go(self.negotiated(info, handle, flags)))
    }

    fn negotiated(
        &self,
        info: ExportInfo,
        handle: ringblock_engine::VolumeHandle,
        flags: u16,
    ) -> Negotiated {
        let base_allocation_id = self
            .meta
            .as_ref()
            .filter(|m| m.base_allocation && m.export == info.name)
            .map(|_| BASE_ALLOCATION_ID);
        Negotiated {
            info,
            handle,
            // Extended headers imply structured replies (every reply is an extended chunk).
            structured_replies: self.structured || self.extended,
            extended_headers: self.extended,
            base_allocation_id,
            transmission_flags: flags,
        }
    }

    fn info_or_go(
        &mut self,
        code: u32,
        req: InfoRequest<'_>,
        go: bool,
    ) -> Result<Step, HandshakeError> {
        let (info, handle) = match self.open_export(req.name) {
            Ok(opened) => opened,
            Err((rep, message)) => {
                self.reply(code, &[error(rep, &message)])?;
                return Ok(Step::Continue);
            }
        };
        let bs = block_size(&info);
        if self.cfg.require_block_size && bs.min > 1 && !req.requests.contains(INFO_BLOCK_SIZE) {
            // The spec asks for the constraints first, to save the client a round trip.
            self.reply(
                code,
                &[
                    OptionReply::InfoBlockSize(bs),
                    error(
                        REP_ERR_BLOCK_SIZE_REQD,
                        "this export needs block size constraints: request INFO_BLOCK_SIZE",
                    ),
                ],
            )?;
            return Ok(Step::Continue);
        }
        let flags = transmission_flags(&info, self.structured || self.extended);
        let mut replies = vec![OptionReply::InfoExport {
            size: info.size_bytes,
            flags,
        }];
        if req.requests.contains(INFO_NAME) {
            replies.push(OptionReply::InfoName(&info.name));
        }
        if req.requests.contains(INFO_DESCRIPTION) {
            replies.push(OptionReply::InfoDescription(&info.description));
        }
        replies.push(OptionReply::InfoBlockSize(bs));
        replies.push(OptionReply::Ack);
        self.reply(code, &replies)?;
        if !go {
            return Ok(Step::Continue);
        }
        Ok(Step::Go(self.negotiated(info, handle, flags)))
    }

    /// Structured replies (or extended headers) are a precondition of meta contexts.
    fn meta_allowed(&mut self, code: u32) -> io::Result<bool> {
        if self.structured || self.extended {
            return Ok(true);
        }
        self.reply(
            code,
            &[error(
                REP_ERR_INVALID,
                "negotiate structured replies or extended headers first",
            )],
        )?;
        Ok(false)
    }

    fn list_meta_context(&mut self, code: u32, req: MetaContextRequest<'_>) -> io::Result<()> {
        if !self.meta_allowed(code)? {
            return Ok(());
        }
        if let Err((rep, message)) = self.open_export(req.export) {
            return self.reply(code, &[error(rep, &message)]);
        }
        // No query lists everything; `base:` is the namespace wildcard; anything else that
        // is not `base:allocation` (unknown namespaces, unknown base leaves) is ignored.
        let base_allocation = req.queries.is_empty()
            || req
                .queries
                .iter()
                .any(|q| q == "base:" || q == META_CONTEXT_BASE_ALLOCATION);
        let mut replies = Vec::with_capacity(2);
        if base_allocation {
            replies.push(OptionReply::MetaContext {
                id: 0,
                name: META_CONTEXT_BASE_ALLOCATION,
            });
        }
        replies.push(OptionReply::Ack);
        self.reply(code, &replies)
    }

    fn set_meta_context(&mut self, code: u32, req: MetaContextRequest<'_>) -> io::Result<()> {
        // Every SET replaces the previous selection, even one that fails.
        self.meta = None;
        if !self.meta_allowed(code)? {
            return Ok(());
        }
        let (info, _handle) = match self.open_export(req.export) {
            Ok(opened) => opened,
            Err((rep, message)) => return self.reply(code, &[error(rep, &message)]),
        };
        // `base:` selects nothing in SET; unknown namespaces and leaves are ignored.
        let base_allocation = req
            .queries
            .iter()
            .any(|q| q == META_CONTEXT_BASE_ALLOCATION);
        self.meta = Some(MetaSelection {
            export: info.name,
            base_allocation,
        });
        let mut replies = Vec::with_capacity(2);
        if base_allocation {
            replies.push(OptionReply::MetaContext {
                id: BASE_ALLOCATION_ID,
                name: META_CONTEXT_BASE_ALLOCATION,
            });
        }
        replies.push(OptionReply::Ack);
        self.reply(code, &replies)
    }
}
