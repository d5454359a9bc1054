// Drives the real, pinned mppx client against a tollgate endpoint. Used by the Rust tests in
// payments/tests and the root crate; prints one JSON object per line on stdout.
//
//   RPC=http://127.0.0.1:PORT KEY=0x... [RESOLVE=host:ip,...] node client.mjs http URL N [METHOD]
//   RPC=... KEY=... node client.mjs manager URL N [close|wait-close]
//   RPC=... KEY=... node client.mjs mcp     MCP_URL TOOL ARGS_JSON N
//
// The chain is the project's local test chain (no real money), configured as Tempo's
// `tempoModerato` (chain id 42431) with its RPC moved to RPC.
import { Mppx, tempo } from 'mppx/client'
import { McpClient } from 'mppx/mcp-sdk/client'
import { Client } from '@modelcontextprotocol/sdk/client/index.js'
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js'
import { privateKeyToAccount } from 'viem/accounts'
import { createClient, http } from 'viem'
import { tempoModerato } from 'viem/chains'

const [mode, target, ...rest] = process.argv.slice(2)
const rpc = process.env.RPC
const chain = { ...tempoModerato, rpcUrls: { default: { http: [rpc] } } }
const client = createClient({ chain, transport: http(rpc) })
const account = privateKeyToAccount(process.env.KEY)
// RESOLVE=name:127.0.0.1 sends requests for `name` to that address with `Host: name` kept
// (tests reach services at <slug>.localhost through the proxy; the resolver knows no such name).
const resolve = Object.fromEntries((process.env.RESOLVE ?? '').split(',').filter(Boolean).map((e) => e.split(':')))
async function resolvingFetch(input, init = {}) {
  const url = new URL(typeof input === 'string' || input instanceof URL ? input : input.url)
  const ip = resolve[url.hostname]
  if (!ip) return fetch(input, init)
  const { request } = await import('node:http')
  const headers = Object.fromEntries(new Headers(init.headers ?? (input instanceof Request ? input.headers : {})).entries())
  headers.host = url.host
  const body = init.body ?? null
  return await new Promise((ok, fail) => {
    const req = request({ host: ip, port: url.port || 80, path: url.pathname + url.search, method: init.method ?? 'GET', headers }, (res) => {
      const chunks = []
      res.on('data', (c) => chunks.push(c))
      res.on('end', () => {
        const h = new Headers()
        for (const [k, v] of Object.entries(res.headers)) for (const x of [].concat(v)) h.append(k, x)
        const status = res.statusCode
        ok(new Response([101, 204, 205, 304].includes(status) ? null : Buffer.concat(chunks), { status, headers: h }))
      })
    })
    req.on('error', fail)
    if (body) req.write(body)
    req.end()
  })
}
const out = (o) => process.stdout.write(JSON.stringify(o, (_, v) => (typeof v === 'bigint' ? v.toString() : v)) + '\n')

function decodeReceipt(h) {
  if (!h) return null
  try {
    return JSON.parse(Buffer.from(h, 'base64url').toString('utf8'))
  } catch {
    return { raw: h }
  }
}

async function body(res) {
  const text = await res.text()
  try {
    return JSON.parse(text)
  } catch {
    return text
  }
}

try {
  if (mode === 'http') {
    const [n, method = 'POST'] = rest
    const mppx = Mppx.create({ polyfill: false, fetch: resolvingFetch, methods: [tempo({ account, getClient: () => client })] })
    for (let i = 0; i < Number(n); i++) {
      const res = await mppx.fetch(target, { method })
      out({ call: i, status: res.status, receipt: decodeReceipt(res.headers.get('payment-receipt')), body: await body(res) })
    }
  } else if (mode === 'manager') {
    const [n, then] = rest
    const m = tempo.session.manager({ account, client })
    for (let i = 0; i < Number(n); i++) {
      const res = await m.fetch(target, { method: 'POST' })
      out({ call: i, status: res.status, channelId: res.channelId, cumulative: res.cumulative, receipt: res.receipt, body: await body(res) })
    }
    if (then === 'wait-close') {
      // The test does something between the payments and the close (e.g. spends credit).
      out({ waiting: true })
      await new Promise((resolve) => process.stdin.once('data', resolve))
      process.stdin.destroy()
    }
    if (then === 'close' || then === 'wait-close') {
      const receipt = await m.close()
      out({ close: true, receipt })
    }
  } else if (mode === 'mcp') {
    const [tool, args, n] = rest
    const sdk = new Client({ name: 'tollgate-interop-agent', version: '1.0.0' })
    await sdk.connect(new StreamableHTTPClientTransport(new URL(target)))
    const paid = McpClient.wrap(sdk, { methods: [tempo({ account, getClient: () => client })] })
    for (let i = 0; i < Number(n); i++) {
      try {
        const r = await paid.callTool({ name: tool, arguments: JSON.parse(args) })
        out({ call: i, isError: r.isError ?? false, structured: r.structuredContent ?? null, text: r.content?.[0]?.text ?? null, receipt: r.receipt ?? r._meta?.['org.paymentauth/receipt'] ?? null })
      } catch (e) {
        out({ call: i, error: { code: e.code ?? null, message: String(e.message ?? e), data: e.data ?? null } })
      }
    }
    await sdk.close()
  } else {
    throw new Error(`unknown mode ${mode}`)
  }
  process.exit(0)
} catch (e) {
  out({ fatal: String(e?.stack ?? e) })
  process.exit(1)
}
