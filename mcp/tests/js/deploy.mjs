// Deploys one small Hono app with the official MCP TypeScript SDK client and prints the tool's
// structuredContent. Usage: node deploy.mjs MCP_URL
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';

const client = new Client({ name: 'tollgate-dev-agent', version: '1.0.0' });
await client.connect(new StreamableHTTPClientTransport(new URL(process.argv[2])));
const r = await client.callTool({
  name: 'deploy_project',
  arguments: {
    project_name: 'hello-agent',
    files: { 'src/index.ts': "import { Hono } from 'hono'\nconst app = new Hono()\napp.get('/', (c) => c.text('hello from an agent'))\nexport default app\n" },
  },
});
console.log(JSON.stringify(r.isError ? { error: r.content?.[0]?.text } : r.structuredContent));
await client.close();
