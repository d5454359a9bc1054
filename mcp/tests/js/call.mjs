// Calls one MCP tool with the official MCP TypeScript SDK client and prints its
// structuredContent (or {"error": text} when the tool failed).
// Usage: node call.mjs MCP_URL TOOL 'JSON_ARGUMENTS'
// With TRACEPARENT set, every HTTP request carries it (W3C trace context).
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';

const [url, name, args] = process.argv.slice(2);
const client = new Client({ name: 'tollgate-test-agent', version: '1.0.0' });
const requestInit = process.env.TRACEPARENT
  ? { headers: { traceparent: process.env.TRACEPARENT } }
  : undefined;
await client.connect(new StreamableHTTPClientTransport(new URL(url), { requestInit }));
const r = await client.callTool({ name, arguments: JSON.parse(args ?? '{}') });
console.log(JSON.stringify(r.isError ? { error: r.content?.[0]?.text } : r.structuredContent));
await client.close();
