#include "server/stop_matcher.h"

#include <string>
#include <vector>

#include <catch2/catch.hpp>

namespace loraplex::server {
namespace {

// Feeds `pieces` one by one and returns everything emitted, Flush included.
std::string Feed(StopMatcher& matcher, const std::vector<std::string>& pieces) {
  std::string out;
  for (const std::string& piece : pieces) out += matcher.Add(piece);
  return out + matcher.Flush();
}

TEST_CASE("StopMatcher without stop strings passes text straight through") {
  StopMatcher matcher({});
  CHECK(matcher.Add("hello") == "hello");
  CHECK(matcher.Flush().empty());
  CHECK_FALSE(matcher.matched());
}

TEST_CASE("StopMatcher cuts the text before a stop string inside one piece") {
  StopMatcher matcher({"END"});
  CHECK(matcher.Add("abcENDdef") == "abc");
  CHECK(matcher.matched());
  CHECK(matcher.matched_stop() == "END");
  CHECK(matcher.Add("more").empty());
  CHECK(matcher.Flush().empty());
}

TEST_CASE("StopMatcher finds a stop string split across pieces and never emits part of it") {
  StopMatcher matcher({"STOP"});
  CHECK(matcher.Add("xyS") == "xy");  // "S" may start "STOP"
  CHECK(matcher.Add("T") == "");
  CHECK(matcher.Add("OPtail") == "");
  CHECK(matcher.matched());
  CHECK(matcher.matched_stop() == "STOP");
}

TEST_CASE("StopMatcher releases held-back text once it cannot become a stop string") {
  StopMatcher matcher({"STOP"});
  CHECK(matcher.Add("aST") == "a");
  CHECK(matcher.Add("x") == "STx");
  CHECK_FALSE(matcher.matched());
}

TEST_CASE("StopMatcher flushes held-back text at the end of the stream") {
  StopMatcher matcher({"STOP"});
  CHECK(Feed(matcher, {"abc", "STO"}) == "abcSTO");
  CHECK_FALSE(matcher.matched());
}

TEST_CASE("StopMatcher picks the earliest match, then the longest stop string on a tie") {
  SECTION("earliest") {
    StopMatcher matcher({"world", "lo"});
    CHECK(matcher.Add("hello world") == "hel");
    CHECK(matcher.matched_stop() == "lo");
  }
  SECTION("longest on a tie") {
    StopMatcher matcher({"ab", "abc"});
    CHECK(matcher.Add("xxabcd") == "xx");
    CHECK(matcher.matched_stop() == "abc");
  }
}

TEST_CASE("StopMatcher keeps multi-byte UTF-8 characters whole around a held-back prefix") {
  StopMatcher matcher({"\xC3\xA9t\xC3\xA9"});  // "été"
  const std::string first = matcher.Add("caf\xC3\xA9");  // "café": its "é" may start "été"
  CHECK(first == "caf");
  CHECK(matcher.Add("!") == "\xC3\xA9!");
  CHECK_FALSE(matcher.matched());
}

}  // namespace
}  // namespace loraplex::server
