// Added latency of a paid MCP call versus an unpaid one, as an agent sees it: the same tool
// (list_projects) on two `tollgate dev` servers, one with --dev-account (no payment, no proof)
// and one with payments (each call: -32042, a zero-amount proof, the call again); and a paid
// top_up (a voucher on an open channel). Interleaved, one after another.
//   RPC=… KEY=0x… node latency.mjs FREE_MCP_URL PAID_MCP_URL N
import { tempo } from 'mppx/client'
import { McpClient } from 'mppx/mcp-sdk/client'
import { Client } from '@modelcontextprotocol/sdk/client/index.js'
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js'
import { privateKeyToAccount } from 'viem/accounts'
import { createClient, http } from 'viem'
import { tempoModerato } from 'viem/chains'

const [freeUrl, paidUrl, n] = process.argv.slice(2)
const rpc = process.env.RPC
const chain = { ...tempoModerato, rpcUrls: { default: { http: [rpc] } } }
const client = createClient({ chain, transport: http(rpc) })
const account = privateKeyToAccount(process.env.KEY)

const free = new Client({ name: 'free', version: '1' })
await free.connect(new StreamableHTTPClientTransport(new URL(freeUrl)))
const sdk = new Client({ name: 'paid', version: '1' })
await sdk.connect(new StreamableHTTPClientTransport(new URL(paidUrl)))
const paid = McpClient.wrap(sdk, { methods: [tempo({ account, getClient: () => client })] })

const pct = (v, p) => { const s = [...v].sort((a, b) => a - b); return s[Math.round((s.length - 1) * p)] }
const time = async (f) => { const t = performance.now(); const r = await f(); if (r.isError) throw new Error(JSON.stringify(r)); return performance.now() - t }
// Warm up both paths (connections, the channel's open).
await time(() => free.callTool({ name: 'list_projects', arguments: {} }))
await time(() => paid.callTool({ name: 'list_projects', arguments: {} }))
await time(() => paid.callTool({ name: 'top_up', arguments: { amount_usd: '0.000001' } }))
const a = [], b = [], c = []
for (let i = 0; i < Number(n); i++) {
  a.push(await time(() => free.callTool({ name: 'list_projects', arguments: {} })))
  b.push(await time(() => paid.callTool({ name: 'list_projects', arguments: {} })))
  c.push(await time(() => paid.callTool({ name: 'top_up', arguments: { amount_usd: '0.000001' } })))
}
const f = (v) => ({ p50_ms: +pct(v, 0.5).toFixed(2), p99_ms: +pct(v, 0.99).toFixed(2) })
console.log(JSON.stringify({ n: Number(n), unpaid: f(a), proof: f(b), voucher: f(c) }))
process.exit(0)
