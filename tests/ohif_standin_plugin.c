/* A stand-in for Orthanc's official OHIF plugin (orthanc-ohif), which Debian does not package:
 * a real Orthanc C plugin with the official plugin's name ("ohif") and default route (/ohif/).
 * tests/test_official_ohif.py builds it with gcc against Debian's orthanc-dev header, installs it
 * as libOrthancOHIF.so (the official library's name) and checks that minipacs leaves /ohif/ to
 * it. It answers every /ohif/ request with a marker and the path asked for. */
#include <orthanc/OrthancCPlugin.h>
#include <stdio.h>

static OrthancPluginContext* context = NULL;

static OrthancPluginErrorCode Serve(OrthancPluginRestOutput* output, const char* url,
                                    const OrthancPluginHttpRequest* request)
{
  char body[1024];
  int size;
  if (request->method != OrthancPluginHttpMethod_Get)
  {
    OrthancPluginSendMethodNotAllowed(context, output, "GET");
    return OrthancPluginErrorCode_Success;
  }
  size = snprintf(body, sizeof(body), "ohif-standin %s\n", url);
  if (size < 0 || size >= (int) sizeof(body))
    return OrthancPluginErrorCode_BadRequest;
  OrthancPluginAnswerBuffer(context, output, body, (uint32_t) size, "text/plain");
  return OrthancPluginErrorCode_Success;
}

ORTHANC_PLUGINS_API int32_t OrthancPluginInitialize(OrthancPluginContext* c)
{
  context = c;
  OrthancPluginRegisterRestCallback(context, "/ohif", Serve);
  OrthancPluginRegisterRestCallback(context, "/ohif/(.*)", Serve);
  return 0;
}

ORTHANC_PLUGINS_API void OrthancPluginFinalize(void)
{
}

ORTHANC_PLUGINS_API const char* OrthancPluginGetName(void)
{
  return "ohif";
}

ORTHANC_PLUGINS_API const char* OrthancPluginGetVersion(void)
{
  return "standin";
}
